//! Where the main executable is mapped in this process, and the build fingerprint.
//!
//! A function is named across the process boundary by its offset from the main
//! executable's load base. Both sides read their own `/proc/self/maps` to find that base
//! (ASLR places it differently in every process) and the ranges that hold code.

use std::hash::{Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

/// The main executable as mapped into this process.
#[derive(Debug)]
pub(crate) struct Image {
    /// Address at which file offset 0 of the executable is mapped.
    base: usize,
    /// Executable (`r-xp`) ranges of the main executable: `[start, end)`.
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
        let exe = std::fs::read_link("/proc/self/exe")
            .map_err(|e| format!("cannot read /proc/self/exe: {e}"))?;
        let exe = exe.to_string_lossy().into_owned();
        let maps = std::fs::read_to_string("/proc/self/maps")
            .map_err(|e| format!("cannot read /proc/self/maps: {e}"))?;
        let meta = std::fs::metadata("/proc/self/exe")
            .map_err(|e| format!("cannot stat /proc/self/exe: {e}"))?;
        Image::parse(&exe, &maps, &meta)
    }

    fn parse(exe: &str, maps: &str, meta: &std::fs::Metadata) -> Result<Image, String> {
        let mut base = None;
        let mut code = Vec::new();
        for line in maps.lines() {
            let Some(m) = Mapping::parse(line) else {
                continue;
            };
            if m.path != exe {
                continue;
            }
            if m.offset == 0 {
                base = Some(base.map_or(m.start, |b: usize| b.min(m.start)));
            }
            if m.executable {
                code.push((m.start, m.end));
            }
        }
        let base = base.ok_or_else(|| format!("the executable {exe} is not in /proc/self/maps"))?;
        if code.is_empty() {
            return Err(format!("no code mapping of {exe} found in /proc/self/maps"));
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
        self.in_code(addr).then(|| (addr - self.base) as u64)
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

/// One line of `/proc/self/maps`.
struct Mapping<'a> {
    start: usize,
    end: usize,
    executable: bool,
    offset: u64,
    path: &'a str,
}

impl<'a> Mapping<'a> {
    fn parse(line: &'a str) -> Option<Mapping<'a>> {
        // 55d0c1a00000-55d0c1a2f000 r-xp 00004000 fd:01 1234567   /usr/bin/prog
        let mut fields = line.splitn(6, ' ');
        let range = fields.next()?;
        let perms = fields.next()?;
        let offset = fields.next()?;
        let _dev = fields.next()?;
        let _inode = fields.next()?;
        let path = fields.next().unwrap_or("").trim_start();
        let (start, end) = range.split_once('-')?;
        Some(Mapping {
            start: usize::from_str_radix(start, 16).ok()?,
            end: usize::from_str_radix(end, 16).ok()?,
            executable: perms.as_bytes().get(2) == Some(&b'x'),
            offset: u64::from_str_radix(offset, 16).ok()?,
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
5600aa000000-5600aa004000 r--p 00000000 fd:01 42      /opt/app (deleted)
5600aa004000-5600aa090000 r-xp 00004000 fd:01 42      /opt/app (deleted)
5600aa090000-5600aa0a0000 r--p 00090000 fd:01 42      /opt/app (deleted)
7f0000000000-7f0000100000 r-xp 00000000 fd:01 77      /usr/lib/libfoo.so
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0       [stack]
";

    fn meta() -> std::fs::Metadata {
        std::fs::metadata("/proc/self/exe").unwrap()
    }

    #[test]
    fn offsets_round_trip_inside_code_only() {
        let img = Image::parse("/opt/app (deleted)", MAPS, &meta()).unwrap();
        let addr = 0x5600aa004100;
        let off = img.offset_of(addr).unwrap();
        assert_eq!(off, 0x4100);
        assert_eq!(img.address_of(off), Some(addr));
        // Read-only data of the executable and code of a library are refused.
        assert_eq!(img.offset_of(0x5600aa000010), None);
        assert_eq!(img.offset_of(0x7f0000000100), None);
        assert_eq!(img.address_of(0x10), None);
        assert_eq!(img.address_of(u64::MAX), None);
    }

    #[test]
    fn missing_executable_is_an_error() {
        assert!(Image::parse("/other", MAPS, &meta()).is_err());
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
