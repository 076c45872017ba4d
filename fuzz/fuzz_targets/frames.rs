//! Frames as a reader gets them, decoded as every message a peer may send.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    procpool::__fuzz::frames(data);
});
