//! Token files, the validation split and packing with a saved position.

use std::path::Path;
use std::sync::Arc;

use fpdt_model::data::{
    DataPosition, PackedLoader, TokenDataset, TokenFile, TokenWidth, LLMC_MAGIC,
};

mod common;
use common::TempDir;

fn write_u16(path: &Path, toks: impl IntoIterator<Item = u32>) {
    let b: Vec<u8> = toks
        .into_iter()
        .flat_map(|t| (t as u16).to_le_bytes())
        .collect();
    std::fs::write(path, b).expect("write");
}

fn write_u32(path: &Path, toks: impl IntoIterator<Item = u32>) {
    let b: Vec<u8> = toks.into_iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(path, b).expect("write");
}

fn err(r: fpdt_model::Result<impl std::fmt::Debug>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_truncated_empty_and_out_of_vocab_files_are_one_line_errors() {
    let d = TempDir::new("bad");
    let missing = d.path("nope.bin");
    let e = err(TokenFile::open(&missing, TokenWidth::U16, 100));
    assert!(
        e.contains("nope.bin") && e.contains("not found") && e.contains("fpdt prepare"),
        "{e}"
    );

    let trunc = d.path("trunc.bin");
    std::fs::write(&trunc, [1u8, 0, 2, 0, 3]).expect("write");
    let e = err(TokenFile::open(&trunc, TokenWidth::U16, 100));
    assert!(
        e.contains("trunc.bin") && e.contains("truncated") && e.contains("5 bytes"),
        "{e}"
    );
    // Six bytes are whole u16 tokens but not whole u32 tokens.
    std::fs::write(&trunc, [1u8, 0, 2, 0, 3, 0]).expect("write");
    assert!(TokenFile::open(&trunc, TokenWidth::U16, 100).is_ok());
    let e = err(TokenFile::open(&trunc, TokenWidth::U32, 100));
    assert!(e.contains("truncated") && e.contains("u32"), "{e}");

    let empty = d.path("empty.bin");
    std::fs::write(&empty, []).expect("write");
    let e = err(TokenFile::open(&empty, TokenWidth::U16, 100));
    assert!(e.contains("empty.bin") && e.contains("empty"), "{e}");

    let big = d.path("big.bin");
    write_u16(&big, [5, 6, 7, 99, 100, 3]);
    let e = err(TokenFile::open(&big, TokenWidth::U16, 100));
    assert!(
        e.contains("big.bin")
            && e.contains("token id 100")
            && e.contains("token 4")
            && e.contains("byte offset 8")
            && e.contains("vocabulary of 100"),
        "{e}"
    );
    assert!(TokenFile::open(&big, TokenWidth::U16, 101).is_ok());
    assert!(!e.contains('\n'), "one line: {e}");

    let e = err(TokenDataset::open(&[], None, 100));
    assert!(e.contains("--data"), "{e}");
}

#[test]
fn u16_u32_and_llmc_files_read_the_same_tokens() {
    let d = TempDir::new("widths");
    let toks: Vec<u32> = (0..1000).map(|i| (i * 37 + 11) % 60_000).collect();
    let a = d.path("a.bin");
    let b = d.path("b.u32");
    let c = d.path("c.bin");
    write_u16(&a, toks.iter().copied());
    write_u32(&b, toks.iter().copied());
    let mut llmc: Vec<u8> = Vec::new();
    let mut header = [0i32; 256];
    header[0] = LLMC_MAGIC;
    header[1] = 1;
    header[2] = toks.len() as i32;
    llmc.extend(header.iter().flat_map(|h| h.to_le_bytes()));
    llmc.extend(toks.iter().flat_map(|&t| (t as u16).to_le_bytes()));
    std::fs::write(&c, llmc).expect("write");

    let ds = TokenDataset::open(&[a, b, c], None, 60_000).expect("open");
    assert_eq!(ds.files()[0].width(), TokenWidth::U16);
    assert_eq!(ds.files()[1].width(), TokenWidth::U32);
    assert!(ds.files()[2].has_llmc_header());
    assert_eq!(ds.len(), 3000);
    for f in ds.files() {
        assert_eq!(f.len(), 1000);
        assert_eq!(f.max_token(), *toks.iter().max().expect("max"));
        assert_eq!(f.get(999), Some(toks[999]));
        assert_eq!(f.get(1000), None);
    }
    let all = ds.tokens(0..3000);
    for k in 0..3 {
        assert_eq!(&all[k * 1000..(k + 1) * 1000], &toks[..]);
    }
    // Across a file boundary.
    assert_eq!(
        ds.tokens(998..1002),
        vec![toks[998], toks[999], toks[0], toks[1]]
    );
}

fn dataset(d: &TempDir, n: u32) -> Arc<TokenDataset> {
    let p = d.path("seq.bin");
    // Token i at stream offset i (mod 60000), so positions are readable.
    write_u16(&p, (0..n).map(|i| i % 60_000));
    Arc::new(TokenDataset::open(&[p], Some(TokenWidth::U16), 60_000).expect("open"))
}

#[test]
fn packing_covers_every_target_once_per_epoch_in_a_seeded_order() {
    let d = TempDir::new("pack");
    let ds = dataset(&d, 1000);
    let split = ds.split(0.1, 16).expect("split");
    assert_eq!(split.val, 900..1000);
    assert_eq!(split.train, 0..900);
    let seq = 16;
    let mut l = PackedLoader::new(ds.clone(), split.train.clone(), seq, 7, true).expect("loader");
    let windows = l.windows();
    let mut starts = Vec::new();
    for _ in 0..windows {
        let s = l.next_sample();
        assert_eq!(s.tokens.len(), seq);
        assert_eq!(s.labels.len(), seq);
        for t in 0..seq {
            assert_eq!(
                s.labels[t] as u32,
                s.tokens[t] + 1,
                "labels are the next tokens"
            );
        }
        starts.push(s.tokens[0] as usize);
    }
    assert_eq!(l.position().epoch, 0);
    // The windows tile the range from the epoch's shift, each once.
    let mut sorted = starts.clone();
    sorted.sort();
    let shift = sorted[0];
    assert!(shift < seq);
    for (i, s) in sorted.iter().enumerate() {
        assert_eq!(*s, shift + i * seq);
    }
    assert!(
        sorted.last().map_or(0, |s| s + seq) < 900,
        "inside the training range"
    );
    assert_ne!(starts, sorted, "shuffled");

    // The same seed gives the same order; another seed another.
    let mut same =
        PackedLoader::new(ds.clone(), split.train.clone(), seq, 7, true).expect("loader");
    let again: Vec<usize> = (0..windows)
        .map(|_| same.next_sample().tokens[0] as usize)
        .collect();
    assert_eq!(again, starts);
    let mut other =
        PackedLoader::new(ds.clone(), split.train.clone(), seq, 8, true).expect("loader");
    let diff: Vec<usize> = (0..windows)
        .map(|_| other.next_sample().tokens[0] as usize)
        .collect();
    assert_ne!(diff, starts);

    // The next epoch begins and differs from the first.
    let next = l.next_sample();
    assert_eq!(l.position().epoch, 1);
    assert_eq!(l.position().cursor, 1);
    let _ = next;

    // Validation: in order from the start of its range, no shift.
    let mut v = PackedLoader::new(ds, split.val, seq, 0, false).expect("val loader");
    assert_eq!(v.next_sample().tokens[0], 900);
    assert_eq!(v.next_sample().tokens[0], 916);
}

#[test]
fn a_restored_position_continues_bit_for_bit_across_epochs() {
    let d = TempDir::new("resume");
    let ds = dataset(&d, 500);
    let range = 0..500;
    let mut a = PackedLoader::new(ds.clone(), range.clone(), 12, 42, true).expect("loader");
    let w = a.windows();
    // Stop mid-way through the second epoch, through JSON as a checkpoint would.
    for _ in 0..w + 5 {
        a.next_sample();
    }
    let saved = serde_json::to_string(&a.position()).expect("json");
    let expected: Vec<_> = (0..3 * w).map(|_| a.next_sample()).collect();

    let pos: DataPosition = serde_json::from_str(&saved).expect("json");
    assert_eq!(pos.epoch, 1);
    let mut b = PackedLoader::new(ds.clone(), range.clone(), 12, 42, true).expect("loader");
    b.restore(pos).expect("restore");
    let got: Vec<_> = (0..3 * w).map(|_| b.next_sample()).collect();
    assert_eq!(got, expected);

    // A position from another sequence length or dataset is refused.
    let mut c = PackedLoader::new(ds.clone(), range, 10, 42, true).expect("loader");
    let e = c
        .restore(pos)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("--seq-len 12") && e.contains("--seq-len 10"),
        "{e}"
    );
    let mut c = PackedLoader::new(ds, 0..400, 12, 42, true).expect("loader");
    assert!(c.restore(pos).is_err());
}

#[test]
fn too_little_data_names_the_flags() {
    let d = TempDir::new("small");
    let ds = dataset(&d, 40);
    let e = err(ds.split(0.0, 64));
    assert!(
        e.contains("--seq-len 64") && e.contains("40 training tokens"),
        "{e}"
    );
    let e = err(ds.split(0.5, 24));
    assert!(e.contains("--val-fraction"), "{e}");
    let e = err(ds.split(1.5, 16));
    assert!(e.contains("--val-fraction"), "{e}");
    assert!(ds.split(0.0, 39).is_ok());
}
