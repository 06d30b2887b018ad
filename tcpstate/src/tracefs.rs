//! tracefs: mounting it when a fresh machine has not, and checking the
//! tracepoint record layout the eBPF program reads.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use tcpstate_common::EXPECTED_LAYOUT;

pub const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";
pub const EVENT: &str = "events/sock/inet_sock_set_state";

/// Returns the tracefs root, mounting it at /sys/kernel/tracing if no
/// mount is found (aya resolves tracepoint ids through it).
pub fn ensure_mounted() -> Result<PathBuf, String> {
    for root in [TRACEFS, DEBUGFS_TRACING] {
        if Path::new(root).join("events").is_dir() {
            return Ok(PathBuf::from(root));
        }
    }
    let c = |s: &str| CString::new(s).map_err(|e| e.to_string());
    let (src, target) = (c("tracefs")?, c(TRACEFS)?);
    // SAFETY: valid NUL-terminated strings; null data is allowed.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(format!(
            "tracefs is not mounted and mounting it at {TRACEFS} failed ({err}); mount it with: mount -t tracefs tracefs {TRACEFS}"
        ));
    }
    Ok(PathBuf::from(TRACEFS))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: usize,
    pub size: usize,
}

/// Parses a tracefs `format` file's `field:` lines.
pub fn parse_format(text: &str) -> Vec<Field> {
    text.lines()
        .filter_map(|line| {
            let mut decl = None;
            let mut offset = None;
            let mut size = None;
            for part in line.split(';') {
                let part = part.trim();
                if let Some(d) = part.strip_prefix("field:") {
                    decl = Some(d);
                } else if let Some(o) = part.strip_prefix("offset:") {
                    offset = o.parse().ok();
                } else if let Some(s) = part.strip_prefix("size:") {
                    size = s.parse().ok();
                }
            }
            let last = decl?.split_whitespace().last()?;
            let name = last.split('[').next()?.to_owned();
            Some(Field {
                name,
                offset: offset?,
                size: size?,
            })
        })
        .collect()
}

/// Refuses to load when any field the program reads moved or changed size:
/// reading a stale offset would silently produce wrong events.
pub fn check_layout(fields: &[Field]) -> Result<(), String> {
    for (name, offset, size) in EXPECTED_LAYOUT {
        match fields.iter().find(|f| f.name == name) {
            None => return Err(format!("field {name} is missing")),
            Some(f) if f.offset != offset || f.size != size => {
                return Err(format!(
                    "field {name} is at offset {} size {}, the program expects offset {offset} size {size}",
                    f.offset, f.size
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Reads and checks the kernel's record layout for the tracepoint.
pub fn verify_tracepoint(root: &Path) -> Result<(), String> {
    let path = root.join(EVENT).join("format");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "the kernel has no sock:inet_sock_set_state tracepoint ({}: {e}); it needs Linux 4.16 or later",
            path.display()
        )
    })?;
    check_layout(&parse_format(&text)).map_err(|e| {
        format!(
            "unsupported sock:inet_sock_set_state layout in {}: {e}",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux 6.18's format file.
    const FORMAT_6_18: &str = "name: inet_sock_set_state
ID: 1502
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s protocol=%s\"
";

    #[test]
    fn accepts_the_current_layout() {
        let fields = parse_format(FORMAT_6_18);
        assert_eq!(fields.len(), 15);
        assert_eq!(
            fields[4],
            Field {
                name: "skaddr".into(),
                offset: 8,
                size: 8
            }
        );
        assert_eq!(check_layout(&fields), Ok(()));
    }

    #[test]
    fn refuses_the_old_u8_protocol_layout() {
        let old = FORMAT_6_18.replace(
            "__u16 protocol;\toffset:30;\tsize:2",
            "__u8 protocol;\toffset:30;\tsize:1",
        );
        let err = check_layout(&parse_format(&old)).expect_err("must refuse");
        assert!(err.contains("protocol"), "{err}");
        let missing = FORMAT_6_18.replace("daddr_v6", "other");
        assert!(check_layout(&parse_format(&missing)).is_err());
    }
}
