//! Where records go. Every record passes through [`Stdout`]; later sinks
//! (log file, metrics) take the same `Record`s.

pub mod http;
pub mod json;
pub mod logfile;
pub mod metrics;
pub mod text;

use std::io::Write as _;

use crate::{cli::Format, record::Record};

/// Buffered stdout: records are serialised into one buffer and written
/// once per ring-buffer batch, not once per line.
pub struct Stdout {
    format: Format,
    color: bool,
    buf: Vec<u8>,
    line: String,
    json: json::JsonWriter,
}

impl Stdout {
    pub fn new(format: Format) -> Self {
        use std::io::IsTerminal as _;
        let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Self {
            format,
            color,
            buf: Vec::with_capacity(64 * 1024),
            line: String::new(),
            json: json::JsonWriter::default(),
        }
    }

    pub fn emit(&mut self, rec: &Record) {
        match self.format {
            Format::Json => self.json.write(&mut self.buf, rec),
            Format::Text => {
                self.line.clear();
                text::write_record(&mut self.line, rec, self.color);
                self.buf.extend_from_slice(self.line.as_bytes());
            }
        }
    }

    pub fn header(&mut self) {
        if self.format == Format::Text {
            self.buf.extend_from_slice(text::HEADER.as_bytes());
            self.buf.push(b'\n');
        }
    }

    /// Writes what is buffered. A closed pipe (`| head`) is reported as
    /// BrokenPipe so the caller can stop quietly.
    pub fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        let r = out.write_all(&self.buf).and_then(|()| out.flush());
        self.buf.clear();
        r
    }
}
