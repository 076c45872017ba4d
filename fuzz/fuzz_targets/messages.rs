//! One frame body decoded as every protocol message (worker, parent, hub both ways).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    procpool::__fuzz::messages(data);
});
