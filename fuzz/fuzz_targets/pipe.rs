//! The bytes a pipe end receives: framing, then items.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    procpool::__fuzz::pipe(data);
});
