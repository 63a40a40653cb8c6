//! PostgreSQL types: which column kind each OID maps to, and fast parsers for the text format.
//!
//! The replication session pins `datestyle=ISO`, `timezone=UTC`, `bytea_output=hex` and
//! `extra_float_digits=3`, so every value arrives in one canonical text form.

pub use crate::model::ColumnKind;

impl ColumnKind {
    /// The kind for a column of type `oid` with modifier `typmod`.
    pub fn from_oid(oid: u32, typmod: i32) -> Self {
        if let Some(elem) = array_element(oid) {
            return ColumnKind::List(Box::new(ColumnKind::from_oid(elem, typmod)));
        }
        match oid {
            16 => ColumnKind::Bool,
            17 => ColumnKind::Bytea,
            20 => ColumnKind::Int64,
            21 | 23 => ColumnKind::Int32,
            700 => ColumnKind::Float32,
            701 => ColumnKind::Float64,
            1082 => ColumnKind::Date,
            1083 => ColumnKind::Time,
            1114 => ColumnKind::Timestamp,
            1184 => ColumnKind::TimestampTz,
            2950 => ColumnKind::Uuid,
            1700 => match numeric_typmod(typmod) {
                Some((p, s)) if p <= 38 => ColumnKind::Decimal {
                    precision: p as u8,
                    scale: s as u8,
                },
                _ => ColumnKind::Text,
            },
            _ => ColumnKind::Text,
        }
    }

    /// Approximate in-memory bytes of one value, for buffer accounting.
    pub fn fixed_width(&self) -> usize {
        match self {
            ColumnKind::Bool => 1,
            ColumnKind::Int32 | ColumnKind::Float32 | ColumnKind::Date => 4,
            ColumnKind::Int64
            | ColumnKind::Float64
            | ColumnKind::Time
            | ColumnKind::Timestamp
            | ColumnKind::TimestampTz => 8,
            ColumnKind::Decimal { .. } | ColumnKind::Uuid => 16,
            ColumnKind::Text | ColumnKind::Bytea | ColumnKind::List(_) => 4,
        }
    }
}

/// `(precision, scale)` of a numeric type modifier, if one is set and the scale is non-negative.
pub fn numeric_typmod(typmod: i32) -> Option<(u16, u16)> {
    if typmod < 4 {
        return None;
    }
    let t = typmod - 4;
    let p = (t >> 16) & 0xffff;
    let s = t & 0x7ff;
    // PostgreSQL 15 allows negative scales (11-bit signed); Iceberg does not.
    if t & 0x400 != 0 || p == 0 || s > p || p > 1000 {
        return None;
    }
    // Precision goes up to 1000: no narrowing here (numeric(300,2) is text, not decimal(44,2)).
    Some((p as u16, s as u16))
}

/// Element OID of a built-in array type.
pub(crate) fn array_element(oid: u32) -> Option<u32> {
    Some(match oid {
        1000 => 16,
        1001 => 17,
        1005 => 21,
        1007 => 23,
        1009 => 25,
        1014 => 1042,
        1015 => 1043,
        1016 => 20,
        1021 => 700,
        1022 => 701,
        1115 => 1114,
        1182 => 1082,
        1183 => 1083,
        1185 => 1184,
        1231 => 1700,
        2951 => 2950,
        3807 => 3802,
        199 => 114,
        _ => return None,
    })
}

/// A value that cannot be converted; the row goes to the dead-letter table with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(pub String);

fn err<T>(what: &str, raw: &[u8]) -> Result<T, ValueError> {
    let shown = String::from_utf8_lossy(&raw[..raw.len().min(64)]);
    Err(ValueError(format!("cannot convert {shown:?} to {what}")))
}

/// Parse a text integer.
pub fn parse_i64(raw: &[u8]) -> Result<i64, ValueError> {
    let (neg, digits) = match raw.first() {
        Some(b'-') => (true, &raw[1..]),
        Some(b'+') => (false, &raw[1..]),
        _ => (false, raw),
    };
    if digits.is_empty() || digits.len() > 19 {
        return err("integer", raw);
    }
    let mut v: i64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return err("integer", raw);
        }
        v = match v
            .checked_mul(10)
            .and_then(|v| v.checked_add((b - b'0') as i64))
        {
            Some(v) => v,
            // i64::MIN has no positive counterpart; take the slow path for it.
            None => {
                return std::str::from_utf8(raw)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| ValueError("integer out of range".into()))
            }
        };
    }
    Ok(if neg { -v } else { v })
}

/// Parse a text int2/int4.
pub fn parse_i32(raw: &[u8]) -> Result<i32, ValueError> {
    i32::try_from(parse_i64(raw)?).map_err(|_| ValueError("integer out of range".into()))
}

/// Parse a float (`NaN`, `Infinity`, `-Infinity` included).
pub fn parse_f64(raw: &[u8]) -> Result<f64, ValueError> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .map_or_else(|| err("double", raw), Ok)
}

/// Parse a bool (`t` / `f`).
pub fn parse_bool(raw: &[u8]) -> Result<bool, ValueError> {
    match raw {
        b"t" | b"true" => Ok(true),
        b"f" | b"false" => Ok(false),
        _ => err("boolean", raw),
    }
}

/// Parse a numeric into an unscaled i128 at `scale`; NaN, infinities and overflow are errors.
pub fn parse_decimal(raw: &[u8], precision: u8, scale: u8) -> Result<i128, ValueError> {
    let (neg, body) = match raw.first() {
        Some(b'-') => (true, &raw[1..]),
        Some(b'+') => (false, &raw[1..]),
        _ => (false, raw),
    };
    if body.is_empty() || !body[0].is_ascii_digit() && body[0] != b'.' {
        return Err(ValueError(format!(
            "numeric {:?} has no decimal representation",
            String::from_utf8_lossy(&raw[..raw.len().min(32)])
        )));
    }
    let (int_part, frac_part) = match body.iter().position(|&b| b == b'.') {
        Some(i) => (&body[..i], &body[i + 1..]),
        None => (body, &body[..0]),
    };
    let mut v: i128 = 0;
    let mut digits = 0usize;
    for &b in int_part {
        if !b.is_ascii_digit() {
            return err("decimal", raw);
        }
        v = v * 10 + (b - b'0') as i128;
        if v != 0 {
            digits += 1;
        }
        if digits > 38 {
            return err("decimal", raw);
        }
    }
    for i in 0..scale as usize {
        let d = match frac_part.get(i) {
            Some(b) if b.is_ascii_digit() => (b - b'0') as i128,
            Some(_) => return err("decimal", raw),
            None => 0,
        };
        v = v * 10 + d;
    }
    // More fractional digits than the column's scale cannot come from a numeric(p,s) column.
    if frac_part.len() > scale as usize && frac_part[scale as usize..].iter().any(|&b| b != b'0') {
        return err(&format!("decimal({precision},{scale})"), raw);
    }
    if v >= 10i128.pow(precision as u32) {
        return err(&format!("decimal({precision},{scale})"), raw);
    }
    Ok(if neg { -v } else { v })
}

fn two(b: &[u8], i: usize) -> Option<u32> {
    let (a, c) = (*b.get(i)?, *b.get(i + 1)?);
    if a.is_ascii_digit() && c.is_ascii_digit() {
        Some(((a - b'0') * 10 + (c - b'0')) as u32)
    } else {
        None
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Parse `YYYY-MM-DD`; returns days since the epoch and the rest of the input.
fn parse_date_prefix(raw: &[u8]) -> Option<(i64, &[u8])> {
    if raw.len() < 10 || raw[4] != b'-' || raw[7] != b'-' {
        return None;
    }
    let y = two(raw, 0)? as i64 * 100 + two(raw, 2)? as i64;
    let m = two(raw, 5)?;
    let d = two(raw, 8)?;
    if !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
        return None;
    }
    Some((days_from_civil(y, m, d), &raw[10..]))
}

/// Parse `HH:MM:SS[.ffffff]`; returns microseconds since midnight and the rest.
fn parse_time_prefix(raw: &[u8]) -> Option<(i64, &[u8])> {
    if raw.len() < 8 || raw[2] != b':' || raw[5] != b':' {
        return None;
    }
    let (h, m, s) = (two(raw, 0)?, two(raw, 3)?, two(raw, 6)?);
    // 24:00:00 is a valid PostgreSQL time.
    if h > 24 || m > 59 || s > 60 || (h == 24 && (m, s) != (0, 0)) {
        return None;
    }
    let mut micros = ((h * 3600 + m * 60 + s) as i64) * 1_000_000;
    let mut rest = &raw[8..];
    if let Some(frac) = rest.strip_prefix(b".") {
        let n = frac.iter().take_while(|b| b.is_ascii_digit()).count();
        if n == 0 || n > 6 {
            return None;
        }
        let mut f: i64 = 0;
        for &b in &frac[..n] {
            f = f * 10 + (b - b'0') as i64;
        }
        micros += f * 10i64.pow(6 - n as u32);
        rest = &frac[n..];
    }
    Some((micros, rest))
}

fn reject_special(raw: &[u8], what: &str) -> Result<(), ValueError> {
    if raw.ends_with(b" BC") || raw == b"infinity" || raw == b"-infinity" {
        return Err(ValueError(format!(
            "{what} {:?} is out of the range Iceberg can store",
            String::from_utf8_lossy(raw)
        )));
    }
    Ok(())
}

/// Parse a date into days since 1970-01-01.
pub fn parse_date(raw: &[u8]) -> Result<i32, ValueError> {
    reject_special(raw, "date")?;
    match parse_date_prefix(raw) {
        Some((d, [])) => Ok(d as i32),
        _ => err("date", raw),
    }
}

/// Microseconds in a day: PostgreSQL's `time` goes up to `24:00:00` inclusive, Iceberg's stops
/// one microsecond before.
const DAY_MICROS: i64 = 86_400_000_000;

/// Parse a time into microseconds since midnight.
pub fn parse_time(raw: &[u8]) -> Result<i64, ValueError> {
    match parse_time_prefix(raw) {
        Some((t, [])) if t < DAY_MICROS => Ok(t),
        Some((_, [])) => Err(ValueError(format!(
            "time {:?} is out of the range Iceberg can store",
            String::from_utf8_lossy(raw)
        ))),
        _ => err("time", raw),
    }
}

/// Parse a timestamp without time zone into microseconds since the epoch.
pub fn parse_timestamp(raw: &[u8]) -> Result<i64, ValueError> {
    reject_special(raw, "timestamp")?;
    let parsed = parse_date_prefix(raw).and_then(|(days, rest)| {
        let rest = rest.strip_prefix(b" ")?;
        let (t, rest) = parse_time_prefix(rest)?;
        Some((days * 86_400_000_000 + t, rest))
    });
    match parsed {
        Some((v, [])) => Ok(v),
        _ => err("timestamp", raw),
    }
}

/// Parse a timestamp with time zone (`...+HH[:MM[:SS]]`) into UTC microseconds since the epoch.
pub fn parse_timestamptz(raw: &[u8]) -> Result<i64, ValueError> {
    reject_special(raw, "timestamptz")?;
    let parsed = parse_date_prefix(raw).and_then(|(days, rest)| {
        let rest = rest.strip_prefix(b" ")?;
        let (t, rest) = parse_time_prefix(rest)?;
        let (sign, off) = match rest.first()? {
            b'+' => (1i64, &rest[1..]),
            b'-' => (-1i64, &rest[1..]),
            _ => return None,
        };
        let h = two(off, 0)? as i64;
        let mut secs = h * 3600;
        let mut tail = &off[2..];
        if let Some(t2) = tail.strip_prefix(b":") {
            secs += two(t2, 0)? as i64 * 60;
            tail = &t2[2..];
            if let Some(t3) = tail.strip_prefix(b":") {
                secs += two(t3, 0)? as i64;
                tail = &t3[2..];
            }
        }
        if !tail.is_empty() {
            return None;
        }
        Some(days * 86_400_000_000 + t - sign * secs * 1_000_000)
    });
    parsed.map_or_else(|| err("timestamptz", raw), Ok)
}

/// Days from 1970-01-01 to 2000-01-01 (PostgreSQL's binary epoch).
const PG_EPOCH_DAYS: i64 = 10_957;
/// 0001-01-01 and 9999-12-31 as days since 1970: the years the text parsers accept too.
const MIN_DAYS: i64 = -719_162;
const MAX_DAYS: i64 = 2_932_896;

/// A timestamp's binary form (µs from 2000-01-01) as µs from 1970-01-01, if it is finite and
/// in the years Iceberg can store (else [`parse_binary`] says why not).
pub fn binary_micros(v: i64) -> Option<i64> {
    let micros = v.checked_add(PG_EPOCH_DAYS * 86_400_000_000)?;
    let days = micros.div_euclid(86_400_000_000);
    (v != i64::MAX && v != i64::MIN && (MIN_DAYS..=MAX_DAYS).contains(&days)).then_some(micros)
}

/// The fixed-width binary (send) form of a value, as a binary COPY sends it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BinaryValue {
    /// int2 / int4 / int8.
    Int(i64),
    /// float4 / float8.
    Float(f64),
    /// bool.
    Bool(bool),
    /// date: days since 1970-01-01.
    Date(i32),
    /// timestamp / timestamptz: microseconds since 1970-01-01 (UTC for timestamptz).
    Micros(i64),
    /// time: microseconds since midnight.
    Time(i64),
}

/// Whether a column of type `oid` is read in binary by the initial snapshot (its send form
/// is cheaper than text for both the server and us); other types are read as text.
pub fn snapshot_binary(oid: u32) -> bool {
    matches!(oid, 16 | 20 | 21 | 23 | 700 | 701 | 1082 | 1114 | 1184)
}

fn be<const N: usize>(raw: &[u8]) -> Option<[u8; N]> {
    raw.try_into().ok()
}

/// Decode the binary form of a value of type `oid` (one of [`snapshot_binary`]'s). Infinite
/// and out-of-range dates and timestamps are refused like their text forms are.
pub fn parse_binary(oid: u32, raw: &[u8]) -> Result<BinaryValue, ValueError> {
    let bad = || {
        ValueError(format!(
            "malformed binary value of type {oid} ({} bytes)",
            raw.len()
        ))
    };
    let out_of_range = |what: &str, v: &str| {
        ValueError(format!(
            "{what} {v:?} is out of the range Iceberg can store"
        ))
    };
    Ok(match oid {
        16 => BinaryValue::Bool(be::<1>(raw).ok_or_else(bad)?[0] != 0),
        21 => BinaryValue::Int(i16::from_be_bytes(be(raw).ok_or_else(bad)?) as i64),
        23 => BinaryValue::Int(i32::from_be_bytes(be(raw).ok_or_else(bad)?) as i64),
        20 => BinaryValue::Int(i64::from_be_bytes(be(raw).ok_or_else(bad)?)),
        700 => BinaryValue::Float(f32::from_be_bytes(be(raw).ok_or_else(bad)?) as f64),
        701 => BinaryValue::Float(f64::from_be_bytes(be(raw).ok_or_else(bad)?)),
        1082 => {
            let d = i32::from_be_bytes(be(raw).ok_or_else(bad)?);
            match d {
                i32::MAX => return Err(out_of_range("date", "infinity")),
                i32::MIN => return Err(out_of_range("date", "-infinity")),
                _ => {}
            }
            let days = d as i64 + PG_EPOCH_DAYS;
            if !(MIN_DAYS..=MAX_DAYS).contains(&days) {
                return Err(out_of_range(
                    "date",
                    &format!("{days} days from 1970-01-01"),
                ));
            }
            BinaryValue::Date(days as i32)
        }
        1114 | 1184 => {
            let what = if oid == 1114 {
                "timestamp"
            } else {
                "timestamptz"
            };
            let v = i64::from_be_bytes(be(raw).ok_or_else(bad)?);
            match v {
                i64::MAX => return Err(out_of_range(what, "infinity")),
                i64::MIN => return Err(out_of_range(what, "-infinity")),
                _ => {}
            }
            // Past the years PostgreSQL has, yet a malformed value must not overflow.
            let Some(micros) = v.checked_add(PG_EPOCH_DAYS * 86_400_000_000) else {
                return Err(out_of_range(what, &format!("{v} µs from 2000-01-01")));
            };
            let days = micros.div_euclid(86_400_000_000);
            if !(MIN_DAYS..=MAX_DAYS).contains(&days) {
                return Err(out_of_range(what, &format!("{micros} µs from 1970-01-01")));
            }
            BinaryValue::Micros(micros)
        }
        1083 => {
            let v = i64::from_be_bytes(be(raw).ok_or_else(bad)?);
            if v == DAY_MICROS {
                return Err(out_of_range("time", "24:00:00"));
            }
            if !(0..DAY_MICROS).contains(&v) {
                return Err(bad());
            }
            BinaryValue::Time(v)
        }
        _ => return Err(bad()),
    })
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Parse a uuid (`8-4-4-4-12` hex).
pub fn parse_uuid(raw: &[u8]) -> Result<[u8; 16], ValueError> {
    let mut out = [0u8; 16];
    let mut n = 0;
    let mut hi: Option<u8> = None;
    for &b in raw {
        if b == b'-' {
            continue;
        }
        let v = match hex(b) {
            Some(v) => v,
            None => return err("uuid", raw),
        };
        match hi.take() {
            None => hi = Some(v),
            Some(h) => {
                if n == 16 {
                    return err("uuid", raw);
                }
                out[n] = h << 4 | v;
                n += 1;
            }
        }
    }
    if n != 16 || hi.is_some() {
        return err("uuid", raw);
    }
    Ok(out)
}

/// Decode a `\x...` hex bytea into `out` (cleared first).
pub fn parse_bytea(raw: &[u8], out: &mut Vec<u8>) -> Result<(), ValueError> {
    out.clear();
    let Some(body) = raw.strip_prefix(b"\\x") else {
        return err("bytea (hex format)", raw);
    };
    if !body.len().is_multiple_of(2) {
        return err("bytea (hex format)", raw);
    }
    out.reserve(body.len() / 2);
    for pair in body.chunks_exact(2) {
        match (hex(pair[0]), hex(pair[1])) {
            (Some(h), Some(l)) => out.push(h << 4 | l),
            _ => return err("bytea (hex format)", raw),
        }
    }
    Ok(())
}

/// One element of a one-dimensional array literal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArrayItem<'a> {
    /// Unquoted `NULL`.
    Null,
    /// Unquoted text, borrowed.
    Plain(&'a [u8]),
    /// Quoted text with escapes resolved.
    Quoted(Vec<u8>),
}

impl ArrayItem<'_> {
    /// The element text (None for NULL).
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            ArrayItem::Null => None,
            ArrayItem::Plain(b) => Some(b),
            ArrayItem::Quoted(v) => Some(v),
        }
    }
}

/// Split a one-dimensional array literal `{a,"b c",NULL}` into its elements, calling `f` for each.
pub fn parse_array<'a>(
    raw: &'a [u8],
    mut f: impl FnMut(ArrayItem<'a>) -> Result<(), ValueError>,
) -> Result<(), ValueError> {
    // Arrays with explicit bounds ("[0:1]={...}") or several dimensions have no Iceberg list form.
    let body = match raw.strip_prefix(b"{").and_then(|r| r.strip_suffix(b"}")) {
        Some(b) => b,
        None => {
            return err(
                "array (only one-dimensional arrays starting at 1 are supported)",
                raw,
            )
        }
    };
    if body.is_empty() {
        return Ok(());
    }
    let mut i = 0;
    loop {
        match body.get(i) {
            Some(b'{') => return err("array (multi-dimensional arrays are not supported)", raw),
            Some(b'"') => {
                let mut v = Vec::new();
                i += 1;
                loop {
                    match body.get(i) {
                        Some(b'\\') => {
                            let Some(&c) = body.get(i + 1) else {
                                return err("array", raw);
                            };
                            v.push(c);
                            i += 2;
                        }
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(&c) => {
                            v.push(c);
                            i += 1;
                        }
                        None => return err("array", raw),
                    }
                }
                f(ArrayItem::Quoted(v))?;
            }
            _ => {
                let start = i;
                while i < body.len() && body[i] != b',' {
                    if body[i] == b'"' || body[i] == b'{' {
                        return err("array", raw);
                    }
                    i += 1;
                }
                let item = &body[start..i];
                f(if item == b"NULL" {
                    ArrayItem::Null
                } else {
                    ArrayItem::Plain(item)
                })?;
            }
        }
        match body.get(i) {
            None => return Ok(()),
            Some(b',') => i += 1,
            Some(_) => return err("array", raw),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(ColumnKind::from_oid(23, -1), ColumnKind::Int32);
        assert_eq!(
            ColumnKind::from_oid(1700, (12 << 16 | 2) + 4),
            ColumnKind::Decimal {
                precision: 12,
                scale: 2
            }
        );
        assert_eq!(ColumnKind::from_oid(1700, -1), ColumnKind::Text);
        // Precisions past 38 are text, also those whose low byte is a small number
        // (numeric(266,10) was taken for decimal(10,10)).
        for (p, s) in [(39, 2), (266, 10), (300, 2), (1000, 0)] {
            assert_eq!(
                ColumnKind::from_oid(1700, (p << 16 | s) + 4),
                ColumnKind::Text,
                "numeric({p},{s})"
            );
        }
        assert_eq!(
            ColumnKind::from_oid(1007, -1),
            ColumnKind::List(Box::new(ColumnKind::Int32))
        );
        assert_eq!(ColumnKind::from_oid(99999, -1), ColumnKind::Text);
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_i64(b"-9223372036854775808").unwrap(), i64::MIN);
        assert_eq!(parse_i32(b"32767").unwrap(), 32767);
        assert!(parse_i32(b"99999999999").is_err());
        assert!(parse_i64(b"12a").is_err());
        assert!(parse_f64(b"NaN").unwrap().is_nan());
        assert_eq!(parse_f64(b"-Infinity").unwrap(), f64::NEG_INFINITY);
        assert_eq!(parse_decimal(b"123.45", 12, 2).unwrap(), 12345);
        assert_eq!(parse_decimal(b"-0.5", 12, 2).unwrap(), -50);
        assert_eq!(parse_decimal(b"7", 12, 2).unwrap(), 700);
        assert!(parse_decimal(b"NaN", 12, 2).is_err());
        assert!(parse_decimal(b"Infinity", 12, 2).is_err());
        assert!(parse_decimal(b"1000", 3, 0).is_err());
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(parse_date(b"1970-01-02").unwrap(), 1);
        assert_eq!(parse_date(b"2000-03-01").unwrap(), 11017);
        assert_eq!(parse_date(b"1969-12-31").unwrap(), -1);
        assert!(parse_date(b"2023-02-29").is_err());
        assert!(parse_date(b"infinity").is_err());
        assert_eq!(parse_time(b"01:02:03.5").unwrap(), 3_723_500_000);
        assert_eq!(parse_time(b"23:59:59.999999").unwrap(), DAY_MICROS - 1);
        // PostgreSQL's end of day has no Iceberg time: a dead letter, in either form.
        let e = parse_time(b"24:00:00").unwrap_err();
        assert!(e.0.contains("out of the range"), "{}", e.0);
        let e = parse_binary(1083, &DAY_MICROS.to_be_bytes()).unwrap_err();
        assert!(e.0.contains("24:00:00"), "{}", e.0);
        assert!(parse_binary(1083, &(DAY_MICROS - 1).to_be_bytes()).is_ok());
        assert_eq!(
            parse_timestamp(b"1970-01-01 00:00:01.000001").unwrap(),
            1_000_001
        );
        assert_eq!(parse_timestamptz(b"1970-01-01 01:00:00+01").unwrap(), 0);
        assert_eq!(
            parse_timestamptz(b"1970-01-01 00:00:00-05:30").unwrap(),
            (5 * 3600 + 1800) * 1_000_000
        );
        assert!(parse_timestamptz(b"infinity").is_err());
        assert!(parse_timestamptz(b"0044-03-15 00:00:00+00 BC").is_err());
    }

    #[test]
    fn uuid_bytea_arrays() {
        let u = parse_uuid(b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap();
        assert_eq!(u[0], 0xa0);
        assert_eq!(u[15], 0x11);
        assert!(parse_uuid(b"xyz").is_err());
        let mut out = Vec::new();
        parse_bytea(b"\\xdeadBEEF", &mut out).unwrap();
        assert_eq!(out, vec![0xde, 0xad, 0xbe, 0xef]);
        let mut items = Vec::new();
        parse_array(br#"{1,NULL,"a \"b\"",c}"#, |i| {
            items.push(i.bytes().map(|b| b.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            items,
            vec![
                Some(b"1".to_vec()),
                None,
                Some(b"a \"b\"".to_vec()),
                Some(b"c".to_vec())
            ]
        );
        assert!(parse_array(b"{{1,2},{3,4}}", |_| Ok(())).is_err());
        assert!(parse_array(b"{}", |_| Ok(())).is_ok());
    }
}
