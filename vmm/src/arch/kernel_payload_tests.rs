use std::io::Write;

use super::*;

/// A fake vmlinux: an ELF magic and enough bytes to compress.
fn vmlinux() -> Vec<u8> {
    let mut elf = ELF_MAGIC.to_vec();
    elf.extend((0..100_000u32).map(|i| (i % 251) as u8));
    elf
}

fn compress(compression: Compression, data: &[u8]) -> Vec<u8> {
    let mut out = match compression {
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Xz => {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => {
            ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
        }
        other => panic!("no encoder for {other:?}"),
    };
    // Like the kernel's build (size_append): the decompressed size after the stream.
    out.extend((data.len() as u32).to_le_bytes());
    out
}

/// A bzImage of boot protocol `version`: 2 setup sectors, then 0x40 bytes of decompressor
/// code, then `payload`.
fn bzimage(version: u16, payload: &[u8]) -> Vec<u8> {
    let hdr = setup_header {
        setup_sects: 2,
        header: SETUP_HEADER_MAGIC,
        version,
        payload_offset: 0x40,
        payload_length: payload.len() as u32,
        ..Default::default()
    };
    let mut image = vec![0u8; 3 * 512 + 0x40];
    image[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>()]
        .copy_from_slice(hdr.as_slice());
    image.extend_from_slice(payload);
    image.extend_from_slice(&[0xcc; 64]); // whatever follows the payload
    image
}

#[test]
fn every_supported_compression_gives_back_the_vmlinux() {
    for c in [Compression::Gzip, Compression::Xz, Compression::Zstd] {
        let image = bzimage(0x020f, &compress(c, &vmlinux()));
        let payload = extract(&image).unwrap_or_else(|e| panic!("{c:?}: {e}"));
        assert_eq!(payload.compression, c);
        assert_eq!(payload.vmlinux, vmlinux(), "{c:?}");
        let located = locate(&image).unwrap();
        assert_eq!({ located.header.version }, 0x020f);
        assert_eq!(located.recorded_size(), Some(vmlinux().len()));
    }
}

#[test]
fn what_is_not_a_bzimage_is_told_apart() {
    assert!(matches!(extract(&vmlinux()), Err(PayloadError::NotBzImage)));
    assert!(matches!(extract(&[]), Err(PayloadError::NotBzImage)));
    assert!(setup_header_of(&vmlinux()).is_none());
}

#[test]
fn an_old_protocol_cannot_locate_its_payload() {
    let image = bzimage(0x0207, &compress(Compression::Gzip, &vmlinux()));
    assert!(matches!(
        extract(&image),
        Err(PayloadError::OldProtocol(0x0207))
    ));
}

#[test]
fn a_payload_past_the_end_of_the_image_is_refused() {
    let mut image = bzimage(0x020f, &compress(Compression::Gzip, &vmlinux()));
    image.truncate(3 * 512 + 0x80);
    let e = extract(&image).err().unwrap();
    assert!(matches!(e, PayloadError::OutOfBounds { .. }), "{e}");
}

#[test]
fn unsupported_and_unknown_formats_are_named() {
    let e = extract(&bzimage(0x020f, b"BZh91AY&SY")).err().unwrap();
    assert_eq!(
        e.to_string(),
        "payload compressed with bzip2, which p2pvmm does not decompress"
    );
    let e = extract(&bzimage(0x020f, b"\x00\x01\x02\x03\x04\x05\x06"))
        .err()
        .unwrap();
    assert!(matches!(e, PayloadError::UnknownFormat(_)), "{e}");
}

#[test]
fn a_corrupt_stream_or_a_payload_that_is_no_elf_is_refused() {
    let mut payload = compress(Compression::Xz, &vmlinux());
    let middle = payload.len() / 2;
    payload[middle] ^= 0xff;
    let e = extract(&bzimage(0x020f, &payload)).err().unwrap();
    assert!(
        matches!(e, PayloadError::Decompress { format: "xz", .. }),
        "{e}"
    );

    let not_elf = compress(Compression::Gzip, b"MZ not an ELF at all");
    let e = extract(&bzimage(0x020f, &not_elf)).err().unwrap();
    assert!(matches!(e, PayloadError::NotElf), "{e}");
}
