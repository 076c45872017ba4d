//! A map chunk's answer, as the parent decodes it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    procpool::__fuzz::chunk_answer(data);
});
