//! A bzImage's kernel, decompressed by p2pvmm instead of by the guest.
//!
//! A bzImage is a real-mode setup, a decompressor, and the compressed `vmlinux` (its payload,
//! which the setup header locates since boot protocol 2.08). Booted as it is, the guest runs the
//! decompressor first, in guest memory it touches for the first time: under nested
//! virtualisation every first touch is an EPT fault handled two levels down. Decompressing the
//! payload here and entering the `vmlinux` ELF directly skips all of that. What the guest's
//! decompressor would also do, randomise the kernel's address (KASLR), is lost;
//! `--kernel-decompress guest` keeps it.

use std::io::Read;

use linux_loader::loader::bootparam::setup_header;
use vm_memory::ByteValued;

/// Where the setup header starts in a bzImage.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// "HdrS".
const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
/// The first boot protocol with `payload_offset` and `payload_length`.
const PAYLOAD_PROTOCOL: u16 = 0x0208;
/// A decompressed kernel larger than this is taken for garbage (or a decompression bomb).
const MAX_VMLINUX_SIZE: u64 = 1 << 30;
const ELF_MAGIC: &[u8] = b"\x7fELF";

#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("not a bzImage (no HdrS setup header)")]
    NotBzImage,
    #[error("boot protocol {0:#06x} does not locate its payload (2.08 or later does)")]
    OldProtocol(u16),
    #[error("payload at {offset:#x}+{len:#x} lies outside the {size:#x}-byte image")]
    OutOfBounds { offset: u64, len: u64, size: u64 },
    #[error("payload compressed with {0}, which p2pvmm does not decompress")]
    Unsupported(&'static str),
    #[error("payload in an unknown format (first bytes {0:02x?})")]
    UnknownFormat(Vec<u8>),
    #[error("decompressing the {format} payload: {source}")]
    Decompress {
        format: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the decompressed payload exceeds {MAX_VMLINUX_SIZE:#x} bytes")]
    TooLarge,
    #[error("the decompressed payload is not an ELF image")]
    NotElf,
}

/// How the payload is compressed, from its magic bytes (what the kernel's own decompressor
/// supports: `CONFIG_KERNEL_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Zstd,
    Bzip2,
    Lzma,
    Lzo,
    Lz4,
}

impl Compression {
    pub fn detect(data: &[u8]) -> Option<Self> {
        let magics: [(&[u8], Self); 7] = [
            (b"\x1f\x8b", Self::Gzip),
            (b"\xfd7zXZ\x00", Self::Xz),
            (b"\x28\xb5\x2f\xfd", Self::Zstd),
            (b"BZh", Self::Bzip2),
            (b"\x5d\x00\x00", Self::Lzma),
            (b"\x89LZO", Self::Lzo),
            (b"\x02\x21\x4c\x18", Self::Lz4),
        ];
        magics
            .into_iter()
            .find(|(magic, _)| data.starts_with(magic))
            .map(|(_, c)| c)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
            Self::Bzip2 => "bzip2",
            Self::Lzma => "lzma",
            Self::Lzo => "lzo",
            Self::Lz4 => "lz4",
        }
    }
}

/// A bzImage's decompressed kernel.
pub struct Payload {
    pub compression: Compression,
    /// The `vmlinux` ELF image (the kernel may append relocation data after it).
    pub vmlinux: Vec<u8>,
}

/// The setup header of `image`, if it is a bzImage.
pub fn setup_header_of(image: &[u8]) -> Option<setup_header> {
    let end = SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>();
    let hdr = setup_header::from_slice(image.get(SETUP_HEADER_OFFSET..end)?)?;
    (hdr.header == SETUP_HEADER_MAGIC).then_some(*hdr)
}

/// A bzImage's payload, located but still compressed.
pub struct Compressed<'a> {
    pub header: setup_header,
    pub compression: Compression,
    data: &'a [u8],
}

impl Compressed<'_> {
    /// The decompressed size the kernel's build appended after the stream (`size_append`).
    pub fn recorded_size(&self) -> Option<usize> {
        let tail = self.data.len().checked_sub(4).map(|at| &self.data[at..])?;
        Some(u32::from_le_bytes(tail.try_into().ok()?) as usize)
    }

    /// Decompresses the payload and checks it is an ELF image.
    pub fn decompress(self) -> Result<Payload, PayloadError> {
        let vmlinux = decompress(self.compression, self.data)?;
        if !vmlinux.starts_with(ELF_MAGIC) {
            return Err(PayloadError::NotElf);
        }
        Ok(Payload {
            compression: self.compression,
            vmlinux,
        })
    }
}

/// Whether `vmlinux` looks like an ELF image (a cached one is checked again).
pub fn is_elf(vmlinux: &[u8]) -> bool {
    vmlinux.starts_with(ELF_MAGIC)
}

/// Finds the payload of the bzImage `image` and names its compression.
pub fn locate(image: &[u8]) -> Result<Compressed<'_>, PayloadError> {
    let header = setup_header_of(image).ok_or(PayloadError::NotBzImage)?;
    if header.version < PAYLOAD_PROTOCOL {
        return Err(PayloadError::OldProtocol(header.version));
    }
    let setup_sects = match header.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    // The payload offset counts from the protected-mode code, right after the setup sectors.
    let offset = (setup_sects + 1) * 512 + u64::from(header.payload_offset);
    let len = u64::from(header.payload_length);
    let size = image.len() as u64;
    let data = usize::try_from(offset)
        .ok()
        .zip(usize::try_from(offset + len).ok())
        .and_then(|(start, end)| image.get(start..end))
        .ok_or(PayloadError::OutOfBounds { offset, len, size })?;
    let compression = Compression::detect(data)
        .ok_or_else(|| PayloadError::UnknownFormat(data.iter().take(6).copied().collect()))?;
    Ok(Compressed {
        header,
        compression,
        data,
    })
}

/// Finds, decompresses and checks the payload of the bzImage `image`.
#[cfg(test)]
pub fn extract(image: &[u8]) -> Result<Payload, PayloadError> {
    locate(image)?.decompress()
}

/// Decompresses the first stream of `data` (the kernel appends the decompressed size after it,
/// which no decoder may read as another stream).
fn decompress(compression: Compression, data: &[u8]) -> Result<Vec<u8>, PayloadError> {
    let format = compression.name();
    let reader: Box<dyn Read + '_> = match compression {
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(data)),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new(data)),
        Compression::Zstd => {
            Box::new(ruzstd::decoding::StreamingDecoder::new(data).map_err(|e| {
                PayloadError::Decompress {
                    format,
                    source: std::io::Error::other(e.to_string()),
                }
            })?)
        }
        other => return Err(PayloadError::Unsupported(other.name())),
    };
    let mut out = Vec::with_capacity(data.len() * 4);
    reader
        .take(MAX_VMLINUX_SIZE + 1)
        .read_to_end(&mut out)
        .map_err(|source| PayloadError::Decompress { format, source })?;
    if out.len() as u64 > MAX_VMLINUX_SIZE {
        return Err(PayloadError::TooLarge);
    }
    Ok(out)
}

#[cfg(test)]
#[path = "kernel_payload_tests.rs"]
mod tests;
