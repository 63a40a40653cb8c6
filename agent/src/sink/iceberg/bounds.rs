//! Column bounds of the data files the agent writes, kept short and correct.
//!
//! The Parquet files are written with exact row-group statistics (no truncation in the
//! footer): iceberg-rust's writer, and [`super::early`], build a file's bounds from its row
//! groups and leave out a row group whose minimum or maximum is inexact, so a file whose long
//! strings were truncated in some row groups and not in others got bounds that excluded rows
//! of the others (engines then skip the file for a matching predicate). Exact statistics make
//! every row group count; the bounds that go to the manifests are then truncated here the way
//! Iceberg's writers do by default (`write.metadata.metrics.default = truncate(16)`): a lower
//! bound to its first 16 characters (bytes for binary), an upper bound to its first 16 with
//! the last one incremented, so that manifests stay small whatever the values' length.

use std::collections::HashMap;

use iceberg::spec::{DataFile, DataFileBuilder, Datum, PrimitiveLiteral, PrimitiveType};

/// Characters (bytes for binary) a string bound keeps, as Iceberg's default metrics mode.
pub const BOUND_LENGTH: usize = 16;

/// Truncate the string and binary bounds longer than [`BOUND_LENGTH`]; an upper bound that
/// cannot be rounded up (every kept character the largest there is) is dropped.
pub fn truncate(lower: &mut HashMap<i32, Datum>, upper: &mut HashMap<i32, Datum>) {
    for d in lower.values_mut() {
        if let Some(t) = truncated(d, false) {
            *d = t;
        }
    }
    let mut drop = Vec::new();
    for (id, d) in upper.iter_mut() {
        if needs(d) {
            match truncated(d, true) {
                Some(t) => *d = t,
                None => drop.push(*id),
            }
        }
    }
    for id in drop {
        upper.remove(&id);
    }
}

/// `file` with its bounds truncated ([`truncate`]); the file itself when none is long.
/// `spec_id` is the partition spec the file was written for (iceberg-rust has no getter).
pub fn truncated_file(file: DataFile, spec_id: i32) -> Result<DataFile, String> {
    if !file.lower_bounds().values().any(needs) && !file.upper_bounds().values().any(needs) {
        return Ok(file);
    }
    let mut lower = file.lower_bounds().clone();
    let mut upper = file.upper_bounds().clone();
    truncate(&mut lower, &mut upper);
    with_bounds(&file, spec_id, lower, upper)
}

/// `file` described with bounds `lower` and `upper` instead of its own; every other field as
/// it is. `spec_id` is the partition spec the file was written for.
pub fn with_bounds(
    file: &DataFile,
    spec_id: i32,
    lower: HashMap<i32, Datum>,
    upper: HashMap<i32, Datum>,
) -> Result<DataFile, String> {
    let mut b = DataFileBuilder::default();
    b.content(file.content_type())
        .file_path(file.file_path().to_string())
        .file_format(file.file_format())
        .partition(file.partition().clone())
        .partition_spec_id(spec_id)
        .record_count(file.record_count())
        .file_size_in_bytes(file.file_size_in_bytes())
        .column_sizes(file.column_sizes().clone())
        .value_counts(file.value_counts().clone())
        .null_value_counts(file.null_value_counts().clone())
        .nan_value_counts(file.nan_value_counts().clone())
        .lower_bounds(lower)
        .upper_bounds(upper)
        .key_metadata(file.key_metadata().map(<[u8]>::to_vec))
        .split_offsets(file.split_offsets().map(<[i64]>::to_vec))
        .equality_ids(file.equality_ids())
        .first_row_id(file.first_row_id())
        .referenced_data_file(file.referenced_data_file())
        .content_offset(file.content_offset())
        .content_size_in_bytes(file.content_size_in_bytes());
    if let Some(id) = file.sort_order_id() {
        b.sort_order_id(id);
    }
    b.build().map_err(|e| e.to_string())
}

/// Whether `d` is a string or binary value longer than a bound keeps.
fn needs(d: &Datum) -> bool {
    match d.literal() {
        PrimitiveLiteral::String(s) => s.chars().nth(BOUND_LENGTH).is_some(),
        PrimitiveLiteral::Binary(b) => {
            matches!(d.data_type(), PrimitiveType::Binary) && b.len() > BOUND_LENGTH
        }
        _ => false,
    }
}

/// `d` cut to [`BOUND_LENGTH`], rounded up for an upper bound; None when it needs no cut, or
/// (upper) when no shorter value is above it.
fn truncated(d: &Datum, up: bool) -> Option<Datum> {
    if !needs(d) {
        return None;
    }
    match d.literal() {
        PrimitiveLiteral::String(s) => {
            let mut chars: Vec<char> = s.chars().take(BOUND_LENGTH).collect();
            if up {
                round_up_chars(&mut chars)?;
            }
            Some(Datum::string(chars.into_iter().collect::<String>()))
        }
        PrimitiveLiteral::Binary(b) => {
            let mut bytes = b[..BOUND_LENGTH].to_vec();
            if up {
                round_up_bytes(&mut bytes)?;
            }
            Some(Datum::binary(bytes))
        }
        _ => None,
    }
}

/// Increment the last character that can be, dropping the ones after it (UTF-8 order is code
/// point order, so the result sorts after every string that starts with the original).
fn round_up_chars(chars: &mut Vec<char>) -> Option<()> {
    while let Some(last) = chars.pop() {
        let mut next = last as u32 + 1;
        // Surrogates are not characters.
        if (0xD800..=0xDFFF).contains(&next) {
            next = 0xE000;
        }
        if let Some(c) = char::from_u32(next) {
            chars.push(c);
            return Some(());
        }
    }
    None
}

/// Increment the last byte below 0xFF, dropping the ones after it.
fn round_up_bytes(bytes: &mut Vec<u8>) -> Option<()> {
    while let Some(last) = bytes.pop() {
        if last < u8::MAX {
            bytes.push(last + 1);
            return Some(());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(lo: Datum, hi: Datum) -> (HashMap<i32, Datum>, HashMap<i32, Datum>) {
        (HashMap::from([(1, lo)]), HashMap::from([(1, hi)]))
    }

    #[test]
    fn long_strings_are_cut_and_the_upper_bound_rounded_up() {
        let (mut lo, mut hi) = bounds(
            Datum::string("0000193a728fd00b6cff91b8840bbf8d"),
            Datum::string("spuuuuuuuuuuuuuuuuuuuuuuuuuuu"),
        );
        truncate(&mut lo, &mut hi);
        assert_eq!(lo[&1], Datum::string("0000193a728fd00b"));
        assert_eq!(hi[&1], Datum::string("spuuuuuuuuuuuuuv"));
        assert!(hi[&1] > Datum::string("spuuuuuuuuuuuuuuuuuuuuuuuuuuu"));
        assert!(lo[&1] <= Datum::string("0000193a728fd00b6cff91b8840bbf8d"));
    }

    #[test]
    fn short_values_and_other_types_are_kept() {
        let (mut lo, mut hi) = bounds(Datum::string("a"), Datum::string("exactly16chars!!"));
        lo.insert(2, Datum::long(5));
        truncate(&mut lo, &mut hi);
        assert_eq!(lo[&1], Datum::string("a"));
        assert_eq!(hi[&1], Datum::string("exactly16chars!!"));
        assert_eq!(lo[&2], Datum::long(5));
    }

    #[test]
    fn characters_count_not_bytes_and_a_maximal_tail_carries() {
        let s: String = "é".repeat(20);
        let (mut lo, mut hi) = bounds(Datum::string(s.clone()), Datum::string(s));
        truncate(&mut lo, &mut hi);
        assert_eq!(lo[&1], Datum::string("é".repeat(16)));
        assert_eq!(hi[&1], Datum::string(format!("{}ê", "é".repeat(15))));
        let top = format!("a{}", char::MAX.to_string().repeat(20));
        let (mut lo, mut hi) = bounds(Datum::string(top.clone()), Datum::string(top));
        truncate(&mut lo, &mut hi);
        assert_eq!(hi[&1], Datum::string("b"));
        let all: String = char::MAX.to_string().repeat(17);
        let (mut lo, mut hi) = bounds(Datum::string(all.clone()), Datum::string(all));
        truncate(&mut lo, &mut hi);
        assert!(hi.is_empty(), "no shorter string is above it");
        assert_eq!(lo[&1], Datum::string(char::MAX.to_string().repeat(16)));
    }

    #[test]
    fn binary_rounds_up_by_byte() {
        let mut v = vec![7u8; 16];
        v.extend([0xFF, 1]);
        let mut top = vec![1u8; 15];
        top.extend([0xFF; 4]);
        let (mut lo, mut hi) = bounds(Datum::binary(v), Datum::binary(top));
        truncate(&mut lo, &mut hi);
        assert_eq!(lo[&1], Datum::binary(vec![7u8; 16]));
        let mut want = vec![1u8; 14];
        want.push(2);
        assert_eq!(hi[&1], Datum::binary(want));
    }
}
