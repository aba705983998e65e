//! Helpers the fuzz targets share: access widths, a reader that hands out input in chunks, and
//! the one-line error check.

use std::io::{self, Read};

use arbitrary::Arbitrary;

/// The width of a guest access. Config-space and MSI-X accesses come from vCPU exits, which
/// are 1, 2, 4 or 8 bytes wide at any alignment.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Width {
    W1,
    W2,
    W4,
    W8,
}

impl Width {
    pub fn bytes(self) -> usize {
        match self {
            Width::W1 => 1,
            Width::W2 => 2,
            Width::W4 => 4,
            Width::W8 => 8,
        }
    }
}

/// Panics unless `message` is one line: every configuration and API error is reported on
/// one line naming the field and value (README, "Running p2pvmm").
pub fn assert_one_line(what: &str, message: &str) {
    assert!(
        !message.contains('\n') && !message.contains('\r'),
        "{what} error is not one line: {message:?}"
    );
}

/// A stream that returns at most `chunk` bytes per read, as a socket may: the HTTP parser must
/// cope with a request head split anywhere.
pub struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl<'a> Chunked<'a> {
    pub fn new(data: &'a [u8], chunk: usize) -> Self {
        Self {
            data,
            chunk: chunk.max(1),
        }
    }
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}
