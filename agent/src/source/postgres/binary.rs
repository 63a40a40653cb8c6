//! The binary (send) form of values, as pgoutput sends them with `binary 'true'` (PostgreSQL
//! 14+): which types the agent reads in binary, and the variable-width parsers (numeric) that
//! the fixed-width `types::parse_binary` does not cover.
//!
//! The server decides per connection, not per column: with `binary 'true'` every column whose
//! type has a send function arrives in binary. So the pipeline streams in binary only when every
//! column of every published table has a type listed in [`supported`]; otherwise in text.

use super::types::ValueError;

/// Types whose binary form is read here, with the column kind their text form maps to:
/// bool, bytea, name, int8, int2, int4, text, json, float4, float8, bpchar, varchar, date,
/// time, timestamp, timestamptz, numeric, uuid, jsonb, and one-dimensional arrays of them.
pub fn supported(oid: u32) -> bool {
    super::types::array_element(oid).is_some_and(scalar_supported) || scalar_supported(oid)
}

fn scalar_supported(oid: u32) -> bool {
    matches!(
        oid,
        16 | 17
            | 19
            | 20
            | 21
            | 23
            | 25
            | 114
            | 700
            | 701
            | 1042
            | 1043
            | 1082
            | 1083
            | 1114
            | 1184
            | 1700
            | 2950
            | 3802
    )
}

/// Types whose binary form is their text, byte for byte (jsonb adds a version byte first).
pub fn is_text(oid: u32) -> bool {
    matches!(oid, 19 | 25 | 114 | 1042 | 1043)
}

const NUMERIC_POS: u16 = 0x0000;
const NUMERIC_NEG: u16 = 0x4000;
const NUMERIC_NAN: u16 = 0xC000;
const NUMERIC_PINF: u16 = 0xD000;
const NUMERIC_NINF: u16 = 0xF000;

/// A numeric in its binary form, checked: base-10000 digit groups, the weight of the first
/// group, the sign and the display scale.
#[derive(Debug, Clone, Copy)]
pub struct Numeric<'a> {
    sign: u16,
    weight: i16,
    dscale: u16,
    /// Big-endian i16 groups, each 0..=9999.
    digits: &'a [u8],
}

/// 10^0 ..= 10^38, every power an i128 holds.
const POW10: [i128; 39] = {
    let mut t = [1i128; 39];
    let mut i = 1;
    while i < 39 {
        t[i] = t[i - 1] * 10;
        i += 1;
    }
    t
};

fn malformed(raw: &[u8]) -> ValueError {
    ValueError(format!("malformed binary numeric ({} bytes)", raw.len()))
}

/// Check and take apart a numeric's binary form.
pub fn parse_numeric(raw: &[u8]) -> Result<Numeric<'_>, ValueError> {
    if raw.len() < 8 {
        return Err(malformed(raw));
    }
    let word = |i: usize| u16::from_be_bytes([raw[i], raw[i + 1]]);
    let ndigits = word(0) as usize;
    let n = Numeric {
        weight: word(2) as i16,
        sign: word(4),
        dscale: word(6),
        digits: &raw[8..],
    };
    if n.digits.len() != ndigits * 2
        || !matches!(
            n.sign,
            NUMERIC_POS | NUMERIC_NEG | NUMERIC_NAN | NUMERIC_PINF | NUMERIC_NINF
        )
        || n.dscale > 0x3FFF
        || (0..ndigits).any(|i| n.group(i as i64) > 9999)
    {
        return Err(malformed(raw));
    }
    Ok(n)
}

impl Numeric<'_> {
    /// Digit group `i` (0 outside the stored groups).
    fn group(&self, i: i64) -> u32 {
        if i < 0 || (i as usize) * 2 >= self.digits.len() {
            return 0;
        }
        let i = i as usize * 2;
        u16::from_be_bytes([self.digits[i], self.digits[i + 1]]) as u32
    }

    fn special(&self) -> Option<&'static str> {
        match self.sign {
            NUMERIC_NAN => Some("NaN"),
            NUMERIC_PINF => Some("Infinity"),
            NUMERIC_NINF => Some("-Infinity"),
            _ => None,
        }
    }

    /// The value × 10^`scale` as an integer, if it has at most `precision` digits and no
    /// non-zero digit beyond `scale` (what `decimal(precision, scale)` holds).
    pub fn to_decimal(&self, precision: u8, scale: u8) -> Result<i128, ValueError> {
        let out_of_range = || {
            let mut s = String::new();
            self.write_text(&mut s);
            ValueError(format!(
                "cannot convert \"{s}\" to decimal({precision},{scale})"
            ))
        };
        if self.special().is_some() {
            return Err(out_of_range());
        }
        let mut acc: i128 = 0;
        for i in 0..(self.digits.len() / 2) as i64 {
            let d = self.group(i);
            // This group is worth d × 10000^(weight − i); scaled by 10^scale. Powers come
            // from a table and the fractional case divides a u32: no 128-bit division.
            let pow = 4 * (self.weight as i64 - i) + scale as i64;
            let part = if pow >= 0 {
                POW10
                    .get(pow as usize)
                    .and_then(|p| (d as i128).checked_mul(*p))
                    .ok_or_else(out_of_range)?
            } else if pow > -4 {
                let div = [1u32, 10, 100, 1000][(-pow) as usize];
                if !d.is_multiple_of(div) {
                    return Err(out_of_range());
                }
                (d / div) as i128
            } else if d == 0 {
                0
            } else {
                return Err(out_of_range());
            };
            acc = acc.checked_add(part).ok_or_else(out_of_range)?;
        }
        if POW10.get(precision as usize).is_some_and(|p| acc >= *p) {
            return Err(out_of_range());
        }
        Ok(if self.sign == NUMERIC_NEG { -acc } else { acc })
    }

    /// Append the value as PostgreSQL's `numeric_out` writes it.
    pub fn write_text(&self, out: &mut String) {
        use std::fmt::Write as _;
        if let Some(s) = self.special() {
            out.push_str(s);
            return;
        }
        if self.sign == NUMERIC_NEG {
            out.push('-');
        }
        if self.weight < 0 {
            out.push('0');
        } else {
            for i in 0..=self.weight as i64 {
                let _ = if i == 0 {
                    write!(out, "{}", self.group(i))
                } else {
                    write!(out, "{:04}", self.group(i))
                };
            }
        }
        if self.dscale > 0 {
            out.push('.');
            for j in 0..self.dscale as i64 {
                let g = self.group(self.weight as i64 + 1 + j / 4);
                let digit = g / 10u32.pow(3 - (j % 4) as u32) % 10;
                out.push(char::from(b'0' + digit as u8));
            }
        }
    }
}

fn be_i32(raw: &[u8], at: usize) -> Result<i32, ValueError> {
    raw.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_be_bytes)
        .ok_or_else(|| ValueError("malformed binary array".into()))
}

/// Walk an array in its binary form (`array_send`: dimensions, a null flag, the element type,
/// each dimension's length and lower bound, then every element as a length and its bytes),
/// calling `f` for each element (None: NULL). Only one-dimensional arrays starting at 1 have
/// an Iceberg list form, as in text; the elements must be of type `elem`.
pub fn parse_array<'a>(
    raw: &'a [u8],
    elem: u32,
    mut f: impl FnMut(Option<&'a [u8]>) -> Result<(), ValueError>,
) -> Result<(), ValueError> {
    let bad = || ValueError("malformed binary array".into());
    let ndim = be_i32(raw, 0)?;
    let element_type = be_i32(raw, 8)? as u32;
    if ndim == 0 {
        return if raw.len() == 12 { Ok(()) } else { Err(bad()) };
    }
    if ndim != 1 {
        return Err(ValueError(
            "array (multi-dimensional arrays are not supported)".into(),
        ));
    }
    if element_type != elem {
        return Err(ValueError(format!(
            "binary array of element type {element_type}, expected {elem}"
        )));
    }
    let (len, lower) = (be_i32(raw, 12)?, be_i32(raw, 16)?);
    if lower != 1 {
        return Err(ValueError(
            "array (only one-dimensional arrays starting at 1 are supported)".into(),
        ));
    }
    if len < 0 {
        return Err(bad());
    }
    let mut at = 20;
    for _ in 0..len {
        let n = be_i32(raw, at)?;
        at += 4;
        if n == -1 {
            f(None)?;
            continue;
        }
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| at.checked_add(n))
            .filter(|&e| e <= raw.len())
            .ok_or_else(bad)?;
        f(Some(&raw[at..end]))?;
        at = end;
    }
    if at == raw.len() {
        Ok(())
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Encode a canonical decimal string the way PostgreSQL's `numeric_send` does (a test
    /// encoder, written from the format: groups of four digits aligned on the decimal point).
    fn encode(text: &str) -> Vec<u8> {
        let (neg, body) = match text.strip_prefix('-') {
            Some(b) => (true, b),
            None => (false, text),
        };
        let (int, frac) = body.split_once('.').unwrap_or((body, ""));
        let dscale = frac.len() as u16;
        let int = int.trim_start_matches('0');
        let pad_int = (4 - int.len() % 4) % 4;
        let pad_frac = (4 - frac.len() % 4) % 4;
        let all = format!(
            "{}{}{}{}",
            "0".repeat(pad_int),
            int,
            frac,
            "0".repeat(pad_frac)
        );
        let mut groups: Vec<u16> = all
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap().parse().unwrap())
            .collect();
        let mut weight = ((pad_int + int.len()) / 4) as i16 - 1;
        while groups.first() == Some(&0) {
            groups.remove(0);
            weight -= 1;
        }
        while groups.last() == Some(&0) {
            groups.pop();
        }
        if groups.is_empty() {
            weight = 0;
        }
        let sign = if neg && !groups.is_empty() {
            NUMERIC_NEG
        } else {
            NUMERIC_POS
        };
        let mut out = Vec::new();
        out.extend((groups.len() as u16).to_be_bytes());
        out.extend(weight.to_be_bytes());
        out.extend(sign.to_be_bytes());
        out.extend(dscale.to_be_bytes());
        for g in groups {
            out.extend(g.to_be_bytes());
        }
        out
    }

    fn text_of(raw: &[u8]) -> String {
        let mut s = String::new();
        parse_numeric(raw).unwrap().write_text(&mut s);
        s
    }

    #[test]
    fn known_values() {
        // Bytes as numeric_send lays them out (checked against a real server by the binary
        // streaming integration test, which compares with text mode).
        let one_half = [0, 1, 0xff, 0xff, 0, 0, 0, 1, 0x13, 0x88];
        assert_eq!(text_of(&one_half), "0.5");
        let big = [0, 3, 0, 1, 0, 0, 0, 2, 0, 12, 0x0d, 0x80, 0x11, 0x94];
        assert_eq!(text_of(&big), "123456.45");
        assert_eq!(
            parse_numeric(&big).unwrap().to_decimal(12, 2).unwrap(),
            12_345_645
        );
        let nan = [0, 0, 0, 0, 0xc0, 0, 0, 0];
        assert_eq!(text_of(&nan), "NaN");
        assert!(parse_numeric(&nan).unwrap().to_decimal(12, 2).is_err());
        assert!(parse_numeric(&[0, 1, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(parse_numeric(&[0, 1, 0, 0, 0, 0, 0, 0, 0x27, 0x10]).is_err());
    }

    #[test]
    fn decimal_limits() {
        let n = encode("1000");
        assert!(parse_numeric(&n).unwrap().to_decimal(3, 0).is_err());
        assert_eq!(parse_numeric(&n).unwrap().to_decimal(4, 0).unwrap(), 1000);
        let f = encode("0.125");
        assert!(parse_numeric(&f).unwrap().to_decimal(5, 2).is_err());
        assert_eq!(parse_numeric(&f).unwrap().to_decimal(5, 3).unwrap(), 125);
        let m = encode("-99999999999999999999999999999999999999");
        assert_eq!(
            parse_numeric(&m).unwrap().to_decimal(38, 0).unwrap(),
            -99_999_999_999_999_999_999_999_999_999_999_999_999
        );
    }

    /// An array as `array_send` writes it (a test encoder, written from the format).
    fn encode_array(elem: u32, lower: i32, items: &[Option<&[u8]>]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend(1i32.to_be_bytes());
        v.extend(i32::from(items.iter().any(Option::is_none)).to_be_bytes());
        v.extend(elem.to_be_bytes());
        v.extend((items.len() as i32).to_be_bytes());
        v.extend(lower.to_be_bytes());
        for it in items {
            match it {
                None => v.extend((-1i32).to_be_bytes()),
                Some(b) => {
                    v.extend((b.len() as i32).to_be_bytes());
                    v.extend(*b);
                }
            }
        }
        v
    }

    fn items(raw: &[u8], elem: u32) -> Result<Vec<Option<Vec<u8>>>, ValueError> {
        let mut out = Vec::new();
        parse_array(raw, elem, |i| {
            out.push(i.map(<[u8]>::to_vec));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn binary_arrays_read_and_bad_ones_are_errors() {
        let raw = encode_array(23, 1, &[Some(&7i32.to_be_bytes()), None, Some(&[])]);
        assert_eq!(
            items(&raw, 23).unwrap(),
            vec![Some(7i32.to_be_bytes().to_vec()), None, Some(vec![])]
        );
        // Empty: no dimensions at all.
        let empty = [0u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 23];
        assert_eq!(items(&empty, 23).unwrap(), vec![]);
        // Another element type, another lower bound, two dimensions, truncated, trailing.
        assert!(items(&raw, 20).is_err());
        assert!(items(&encode_array(23, 0, &[None]), 23).is_err());
        let mut two = raw.clone();
        two[3] = 2;
        assert!(items(&two, 23).unwrap_err().0.contains("multi-dimensional"));
        assert!(items(&raw[..raw.len() - 1], 23).is_err());
        let mut long = raw.clone();
        long.push(0);
        assert!(items(&long, 23).is_err());
        assert!(supported(1007) && supported(1009) && supported(3807) && !supported(1034));
    }

    proptest! {
        /// Arrays of any items survive encode → parse; any cut or bytes never panic.
        #[test]
        fn arrays_round_trip_and_never_panic(
            list in proptest::collection::vec(proptest::option::of(proptest::collection::vec(any::<u8>(), 0..12)), 0..20),
            cut in any::<usize>(),
            noise in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let borrowed: Vec<Option<&[u8]>> = list.iter().map(|o| o.as_deref()).collect();
            let raw = encode_array(25, 1, &borrowed);
            prop_assert_eq!(items(&raw, 25).unwrap(), list);
            let _ = items(&raw[..cut % (raw.len() + 1)], 25);
            let _ = items(&noise, 25);
        }

        /// Any canonical numeric text survives encode → decode as the same text, and as a
        /// decimal it is the text's digits at the text's scale.
        #[test]
        fn text_and_decimal_agree(
            neg in any::<bool>(),
            int in "[1-9][0-9]{0,20}|0",
            frac in "[0-9]{0,12}",
        ) {
            let text = if frac.is_empty() { int.clone() } else { format!("{int}.{frac}") };
            let is_zero = text.bytes().all(|b| b == b'0' || b == b'.');
            let text = if neg && !is_zero { format!("-{text}") } else { text };
            let raw = encode(&text);
            prop_assert_eq!(text_of(&raw), text.clone());
            let scale = frac.len() as u8;
            let digits: String = text.chars().filter(|c| c.is_ascii_digit()).collect();
            let want: i128 = digits.parse::<i128>().unwrap() * if text.starts_with('-') { -1 } else { 1 };
            prop_assert_eq!(parse_numeric(&raw).unwrap().to_decimal(38, scale).unwrap(), want);
        }

        /// Arbitrary bytes never panic the parser or the renderer.
        #[test]
        fn arbitrary_bytes_do_not_panic(raw in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(n) = parse_numeric(&raw) {
                let mut s = String::new();
                n.write_text(&mut s);
                let _ = n.to_decimal(38, 4);
            }
        }
    }
}
