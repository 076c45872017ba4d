//! Where the main executable is loaded in this process, and the build fingerprint.
//!
//! A function is named across the process boundary by its offset from the main
//! executable's load base. Both sides ask their own dynamic loader for that base (ASLR
//! places it differently in every process) and for the segments that hold code
//! (`dl_iterate_phdr`, whose first object is the main program: no `/proc/self/maps` to
//! parse, so no path in it, non-UTF-8 or mapped twice, can mislead it).

use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

/// The main executable as loaded into this process.
#[derive(Debug)]
pub(crate) struct Image {
    /// The load bias: what was added to the executable's virtual addresses.
    base: usize,
    /// Executable segments of the main executable: `[start, end)`.
    code: Vec<(usize, usize)>,
    /// Identifies the build: equal in two processes only if they run the same file.
    fingerprint: u64,
}

impl Image {
    /// This process's image, read once.
    pub(crate) fn get() -> Result<&'static Image, String> {
        static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
        IMAGE
            .get_or_init(Image::read)
            .as_ref()
            .map_err(Clone::clone)
    }

    fn read() -> Result<Image, String> {
        let (base, code) = super::sys::main_program();
        let meta = std::fs::metadata("/proc/self/exe")
            .map_err(|e| format!("cannot stat /proc/self/exe: {e}"))?;
        let image = Image::new(base, code, &meta)?;
        // The loader's first object is the main program; make sure (this very function
        // is code of the executable that links procpool, unless procpool is in a
        // dynamically loaded library, where no target could run in a child anyway).
        if !image.in_code(Image::read as fn() -> Result<Image, String> as usize) {
            return Err(
                "procpool's own code is not in the main executable (is procpool \
                        linked into a dynamically loaded library?)"
                    .to_owned(),
            );
        }
        Ok(image)
    }

    fn new(
        base: usize,
        code: Vec<(usize, usize)>,
        meta: &std::fs::Metadata,
    ) -> Result<Image, String> {
        if code.is_empty() || code.iter().any(|&(s, e)| s < base || e < s) {
            return Err(format!(
                "the dynamic loader reports no usable code segment of the main executable \
                 (base {base:#x}, segments {code:x?})"
            ));
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
        )
            .hash(&mut h);
        for &(start, end) in &code {
            (start - base, end - start).hash(&mut h);
        }
        crate::wire::PROTOCOL_VERSION.hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        Ok(Image {
            base,
            code,
            fingerprint: h.finish(),
        })
    }

    /// The build fingerprint exchanged in the handshake.
    pub(crate) fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The offset of `addr` from the load base, if `addr` lies in the executable's code.
    pub(crate) fn offset_of(&self, addr: usize) -> Option<u64> {
        self.in_code(addr)
            .then(|| u64::try_from(addr - self.base).ok())
            .flatten()
    }

    /// The address of `offset` in this process, if it lies in the executable's code.
    pub(crate) fn address_of(&self, offset: u64) -> Option<usize> {
        let addr = self.base.checked_add(usize::try_from(offset).ok()?)?;
        self.in_code(addr).then_some(addr)
    }

    fn in_code(&self, addr: usize) -> bool {
        self.code.iter().any(|&(s, e)| s <= addr && addr < e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> std::fs::Metadata {
        std::fs::metadata("/proc/self/exe").unwrap()
    }

    #[test]
    fn offsets_round_trip_inside_code_only() {
        let base = 0x5600aa000000;
        let img = Image::new(base, vec![(0x5600aa004000, 0x5600aa090000)], &meta()).unwrap();
        let addr = 0x5600aa004100;
        let off = img.offset_of(addr).unwrap();
        assert_eq!(off, 0x4100);
        assert_eq!(img.address_of(off), Some(addr));
        // Data of the executable and code elsewhere are refused.
        assert_eq!(img.offset_of(0x5600aa000010), None);
        assert_eq!(img.offset_of(0x7f0000000100), None);
        assert_eq!(img.address_of(0x10), None);
        assert_eq!(img.address_of(u64::MAX), None);
    }

    #[test]
    fn no_code_or_code_below_the_base_is_an_error() {
        assert!(Image::new(0x1000, vec![], &meta()).is_err());
        assert!(Image::new(0x5000, vec![(0x1000, 0x2000)], &meta()).is_err());
    }

    #[test]
    fn this_process_has_an_image() {
        let img = Image::get().unwrap();
        let f = offsets_round_trip_inside_code_only as fn() as usize;
        let off = img
            .offset_of(f)
            .expect("a test fn lives in the main executable");
        assert_eq!(img.address_of(off), Some(f));
    }
}
