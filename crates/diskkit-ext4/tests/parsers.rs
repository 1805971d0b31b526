//! Property tests of the partition-table and PE parsers against tables and files built here,
//! and robustness against arbitrary mutations of them.

use diskkit_ext4::read::fuzzing;
use diskkit_ext4::read::partition::{read_partition_table, PartitionType, TableKind};
use diskkit_ext4::read::pe::{build_test_pe, parse_pe};
use proptest::prelude::*;

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// Build a disk of `sectors` 512-byte sectors with a protective MBR and a primary GPT holding
/// `parts` as (first LBA, last LBA, name).
fn gpt_disk(sectors: u64, parts: &[(u64, u64, String)]) -> Vec<u8> {
    let mut d = vec![0u8; (sectors * 512) as usize];
    // Protective MBR.
    d[446 + 4] = 0xee;
    d[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    d[446 + 12..446 + 16].copy_from_slice(&((sectors - 1).min(u32::MAX as u64) as u32).to_le_bytes());
    d[510] = 0x55;
    d[511] = 0xaa;
    let count = 128u32;
    let mut array = vec![0u8; count as usize * 128];
    for (i, (first, last, name)) in parts.iter().enumerate() {
        let e = &mut array[i * 128..(i + 1) * 128];
        e[0..16].copy_from_slice(
            uuid::Uuid::parse_str("0fc63daf-8483-4772-8e79-3d69d8477de4")
                .unwrap()
                .to_bytes_le()
                .as_slice(),
        );
        e[16..32].copy_from_slice(&[(i + 1) as u8; 16]);
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
        for (k, u) in name.encode_utf16().take(36).enumerate() {
            e[56 + k * 2..58 + k * 2].copy_from_slice(&u.to_le_bytes());
        }
    }
    d[1024..1024 + array.len()].copy_from_slice(&array);
    let h = &mut d[512..1024];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&1u64.to_le_bytes());
    h[32..40].copy_from_slice(&(sectors - 1).to_le_bytes());
    h[40..48].copy_from_slice(&34u64.to_le_bytes());
    h[48..56].copy_from_slice(&(sectors - 34).to_le_bytes());
    h[72..80].copy_from_slice(&2u64.to_le_bytes());
    h[80..84].copy_from_slice(&count.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    h[88..92].copy_from_slice(&CRC32.checksum(&array).to_le_bytes());
    let crc = CRC32.checksum(&h[..92]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    d
}

fn parts_strategy() -> impl Strategy<Value = (u64, Vec<(u64, u64, String)>)> {
    (200u64..2000).prop_flat_map(|sectors| {
        let usable = 34..sectors - 34;
        let part = (usable.clone(), 0u64..100, "[a-zA-Z0-9 éü]{0,20}");
        (Just(sectors), prop::collection::vec(part, 0..6)).prop_map(move |(sectors, raw)| {
            let parts = raw
                .into_iter()
                .map(|(first, len, name)| (first, (first + len).min(sectors - 35), name))
                .filter(|(f, l, _)| f <= l)
                .collect();
            (sectors, parts)
        })
    })
}

proptest! {
    #[test]
    fn gpt_tables_round_trip((sectors, parts) in parts_strategy()) {
        let disk = gpt_disk(sectors, &parts);
        let t = read_partition_table(&disk[..], 512).unwrap().unwrap();
        prop_assert_eq!(t.kind, TableKind::Gpt);
        prop_assert_eq!(t.partitions.len(), parts.len());
        for (p, (first, last, name)) in t.partitions.iter().zip(&parts) {
            prop_assert_eq!(p.offset, first * 512);
            prop_assert_eq!(p.size, (last - first + 1) * 512);
            prop_assert_eq!(&p.name, name);
            prop_assert!(matches!(p.kind, PartitionType::Guid(_)));
        }
    }

    #[test]
    fn mutated_gpt_never_panics((sectors, parts) in parts_strategy(), flips in prop::collection::vec((0usize..20_000, any::<u8>()), 1..8)) {
        let mut disk = gpt_disk(sectors, &parts);
        for (at, v) in flips {
            let n = disk.len();
            disk[at % n.min(20_000)] = v;
        }
        fuzzing::partition_table(&disk);
    }

    #[test]
    fn pe_sections_round_trip(sections in prop::collection::vec(("\\.[a-z]{1,7}", prop::collection::vec(any::<u8>(), 0..3000)), 1..8)) {
        let refs: Vec<(&str, &[u8])> = sections.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        let pe = build_test_pe(&refs);
        let parsed = parse_pe(&pe[..]).unwrap();
        prop_assert_eq!(parsed.sections.len(), sections.len());
        for (s, (name, data)) in parsed.sections.iter().zip(&sections) {
            prop_assert_eq!(&s.name, name);
            let (off, len) = s.file_range();
            prop_assert_eq!(&pe[off as usize..(off + len) as usize], data.as_slice());
        }
    }

    #[test]
    fn mutated_pe_never_panics(flips in prop::collection::vec((0usize..1024, any::<u8>()), 1..16), cut in 0usize..4096) {
        let mut pe = build_test_pe(&[(".linux", &[1u8; 700]), (".initrd", &[2u8; 300]), (".cmdline", b"x")]);
        for (at, v) in flips {
            let n = pe.len();
            pe[at % n] = v;
        }
        pe.truncate(cut.max(1).min(pe.len()));
        fuzzing::pe_sections(&pe);
    }
}
