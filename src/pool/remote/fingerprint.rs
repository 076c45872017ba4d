//! This executable's content fingerprint: its ELF build-id, else the SHA-256 of its
//! file; what names the task stream its nodes read (DESIGN.md §10).

use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// The fingerprint of the running executable, as lowercase hex, computed once.
///
/// # Errors
///
/// The executable cannot be read (`/proc/self/exe`).
pub(crate) fn fingerprint() -> Result<&'static str, String> {
    static FP: OnceLock<Result<String, String>> = OnceLock::new();
    FP.get_or_init(|| {
        let exe = std::fs::read("/proc/self/exe")
            .map_err(|e| format!("cannot read this executable to fingerprint it: {e}"))?;
        Ok(of_file(&exe))
    })
    .as_deref()
    .map_err(Clone::clone)
}

/// The fingerprint of an executable's bytes: `id-<build-id>` or `sha-<sha256>`.
pub(crate) fn of_file(exe: &[u8]) -> String {
    match build_id(exe) {
        Some(id) => format!("id-{}", hex(id)),
        None => format!("sha-{}", hex(&Sha256::digest(exe))),
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        // Writing to a String cannot fail.
        write!(s, "{b:02x}").ok();
        s
    })
}

/// The `NT_GNU_BUILD_ID` note of a 64-bit little-endian ELF file, from its program
/// headers' `PT_NOTE` segments; `None` if it has none or is not such a file. Every
/// offset and length is checked against the file.
fn build_id(elf: &[u8]) -> Option<&[u8]> {
    const PT_NOTE: u32 = 4;
    const NT_GNU_BUILD_ID: u32 = 3;
    if elf.get(..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None; // not ELF64, little-endian
    }
    let u16_at = |at: usize| Some(u16::from_le_bytes(elf.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| {
        let v = u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?);
        usize::try_from(v).ok()
    };
    let phoff = u64_at(0x20)?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? != PT_NOTE {
            continue;
        }
        let (off, size) = (u64_at(ph + 8)?, u64_at(ph + 32)?);
        let notes = elf.get(off..off.checked_add(size)?)?;
        let mut at = 0;
        while at + 12 <= notes.len() {
            let word = |k: usize| -> Option<usize> {
                let b = notes.get(at + 4 * k..at + 4 * k + 4)?;
                usize::try_from(u32::from_le_bytes(b.try_into().ok()?)).ok()
            };
            let (namesz, descsz, kind) = (word(0)?, word(1)?, word(2)?);
            let name_at = at + 12;
            let desc_at = name_at.checked_add(namesz.checked_add(3)? & !3)?;
            let end = desc_at.checked_add(descsz.checked_add(3)? & !3)?;
            if kind == NT_GNU_BUILD_ID as usize && notes.get(name_at..name_at + namesz)? == b"GNU\0"
            {
                return notes
                    .get(desc_at..desc_at + descsz)
                    .filter(|d| !d.is_empty());
            }
            at = end;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_executable_has_a_build_id_and_garbage_has_none() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let fp = of_file(&exe);
        assert!(fp.starts_with("id-") && fp.len() > 10, "{fp}");
        assert_eq!(fingerprint().unwrap(), fp);
        assert!(build_id(b"not an ELF file").is_none());
        // Truncated anywhere: no panic, no build-id or a hash.
        for cut in [4, 64, 0x40, 0x300, exe.len() / 2] {
            let part = &exe[..cut.min(exe.len())];
            assert!(build_id(part).is_none() || cut > 0x300);
        }
        assert!(of_file(b"x").starts_with("sha-"));
    }
}
