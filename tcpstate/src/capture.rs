//! A capture of what the rings gave, drain by drain, for `tcpstate replay`: the daemon's
//! userspace cost measured on real traffic with no kernel (`cargo xtask bench`'s replay
//! rows). Written by the collector thread only when `tcpstate run --capture-events FILE` asks
//! (a benchmark's flag: it puts file writes on the draining thread).
//!
//! Format: a magic line, then per drain a header (cutoff ns, u64; last, u8; events, u32; all
//! little-endian) and that many raw [`Event`]s, as the program wrote them.

use std::io::{self, BufWriter, Read, Write};

use tcpstate_common::Event;

const MAGIC: &[u8; 16] = b"tcpstate-capt-1\n";

/// One drain: the events every ring gave, each ring's in its order, and the cutoff the merge
/// released them under.
#[derive(Debug, Default)]
pub struct Drain {
    pub cutoff_ns: u64,
    pub last: bool,
    pub events: Vec<Event>,
}

pub struct Writer {
    out: BufWriter<std::fs::File>,
}

impl Writer {
    pub fn create(path: &std::path::Path) -> io::Result<Self> {
        let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
        out.write_all(MAGIC)?;
        Ok(Self { out })
    }

    pub fn drain(&mut self, cutoff_ns: u64, last: bool, events: &[Event]) -> io::Result<()> {
        let n = u32::try_from(events.len()).map_err(io::Error::other)?;
        self.out.write_all(&cutoff_ns.to_le_bytes())?;
        self.out.write_all(&[u8::from(last)])?;
        self.out.write_all(&n.to_le_bytes())?;
        for ev in events {
            // SAFETY: Event is repr(C) plain data without padding (its size is pinned in
            // tcpstate-common); the bytes are read back by `read_drains` only.
            let bytes = unsafe {
                std::slice::from_raw_parts(std::ptr::from_ref(ev).cast::<u8>(), size_of::<Event>())
            };
            self.out.write_all(bytes)?;
        }
        if last {
            self.out.flush()?;
        }
        Ok(())
    }
}

/// Every drain of a capture, in order.
pub fn read_drains(mut r: impl Read) -> io::Result<Vec<Drain>> {
    let mut magic = [0u8; 16];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a tcpstate capture (tcpstate run --capture-events writes one)",
        ));
    }
    let mut drains = Vec::new();
    let mut head = [0u8; 13];
    loop {
        match r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(drains),
            Err(e) => return Err(e),
        }
        let cutoff_ns = u64::from_le_bytes(head[..8].try_into().map_err(io::Error::other)?);
        let last = head[8] != 0;
        let n = u32::from_le_bytes(head[9..13].try_into().map_err(io::Error::other)?);
        let mut events = Vec::with_capacity(n as usize);
        let mut buf = vec![0u8; size_of::<Event>()];
        for _ in 0..n {
            r.read_exact(&mut buf)?;
            // SAFETY: `buf` holds one Event's bytes; Event is plain data, read unaligned.
            events.push(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<Event>()) });
        }
        drains.push(Drain {
            cutoff_ns,
            last,
            events,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::event_at;

    #[test]
    fn drains_come_back_as_written() {
        let path = std::env::temp_dir().join(format!("capture-{}", std::process::id()));
        let mut w = Writer::create(&path).expect("create");
        w.drain(10, false, &[event_at(1, 1), event_at(2, 2)])
            .expect("write");
        w.drain(20, true, &[event_at(3, 3)]).expect("write");
        drop(w);
        let file = std::fs::File::open(&path).expect("open");
        let drains = read_drains(std::io::BufReader::new(file)).expect("read");
        let _ = std::fs::remove_file(&path);
        let got: Vec<(u64, bool, Vec<u64>)> = drains
            .iter()
            .map(|d| {
                (
                    d.cutoff_ns,
                    d.last,
                    d.events.iter().map(|e| e.ts_ns).collect(),
                )
            })
            .collect();
        assert_eq!(got, [(10, false, vec![1, 2]), (20, true, vec![3])]);
        assert!(read_drains(&b"not a capture at all"[..]).is_err());
    }
}
