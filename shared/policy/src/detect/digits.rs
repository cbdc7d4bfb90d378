//! Card numbers and US SSNs: one pass over digit runs (digits with single ` ` or `-` separators
//! between groups), since neither has a literal to anchor on.
//!
//! - SSN: exactly `ddd-dd-dddd` or `ddd dd dddd`, one separator kind, and a number the SSA could
//!   issue (area not 000, 666 or 9xx; group not 00; serial not 0000). Nine bare digits are not
//!   reported: they are indistinguishable from any other identifier.
//! - Card: 13–19 digits, a known issuer prefix for that length (Visa, Mastercard, Amex, Discover,
//!   JCB, Diners, UnionPay), groups of at most 6 digits with one separator kind, and a valid Luhn
//!   checksum. Luhn-invalid numbers, timestamps and order ids do not qualify.

use super::{Hit, RuleMask, is_word_byte};
use crate::rules::Rule;

const MAX_GROUPS: usize = 8;

pub(crate) fn scan(bytes: &[u8], from: usize, mask: &RuleMask, hits: &mut Vec<Hit>) {
    let mut i = from;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let start = i;
        let mut digits = [0u8; 19];
        let mut count = 0usize;
        let mut groups = [0usize; MAX_GROUPS];
        let mut group_count = 1usize;
        let mut separator: Option<u8> = None;
        let mut mixed = false;
        let mut end = i;
        while end < bytes.len() {
            let b = bytes[end];
            if b.is_ascii_digit() {
                if count < digits.len() {
                    digits[count] = b - b'0';
                }
                count += 1;
                if group_count <= MAX_GROUPS {
                    groups[group_count - 1] += 1;
                }
                end += 1;
            } else if matches!(b, b' ' | b'-') && bytes.get(end + 1).is_some_and(u8::is_ascii_digit) {
                mixed |= separator.is_some_and(|s| s != b);
                separator = Some(b);
                group_count += 1;
                end += 1;
            } else {
                break;
            }
        }
        i = end;
        if !standalone(bytes, start, end) || mixed || group_count > MAX_GROUPS {
            continue;
        }
        let groups = &groups[..group_count];
        if mask.has(Rule::UsSsn) && groups == [3, 2, 4] && valid_ssn(&digits[..9]) {
            hits.push(Hit { start, end, rule: Rule::UsSsn, hint: 0, anchor: start });
        } else if mask.has(Rule::CardNumber)
            && (13..=19).contains(&count)
            && groups.iter().all(|g| *g <= 6 || group_count == 1)
            && known_issuer(&digits[..count])
            && luhn_valid(&digits[..count])
        {
            hits.push(Hit { start, end, rule: Rule::CardNumber, hint: 0, anchor: start });
        }
    }
}

/// Not part of a word, a decimal number or a dotted version (`v1.4111…`, `3.14`, `x4111…`).
fn standalone(bytes: &[u8], start: usize, end: usize) -> bool {
    let before_ok = start == 0
        || !(is_word_byte(bytes[start - 1])
            || (matches!(bytes[start - 1], b'.' | b',' | b'-')
                && start >= 2
                && bytes[start - 2].is_ascii_alphanumeric()));
    let after_ok = end == bytes.len()
        || !(is_word_byte(bytes[end])
            || (matches!(bytes[end], b'.' | b',' | b'-') && bytes.get(end + 1).is_some_and(u8::is_ascii_alphanumeric)));
    before_ok && after_ok
}

fn valid_ssn(d: &[u8]) -> bool {
    let area = u16::from(d[0]) * 100 + u16::from(d[1]) * 10 + u16::from(d[2]);
    let group = d[3] * 10 + d[4];
    let serial = d[5..9].iter().fold(0u16, |acc, x| acc * 10 + u16::from(*x));
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

fn prefix(d: &[u8], n: usize) -> u32 {
    d[..n].iter().fold(0u32, |acc, x| acc * 10 + u32::from(*x))
}

fn known_issuer(d: &[u8]) -> bool {
    let len = d.len();
    let p2 = prefix(d, 2);
    let p3 = prefix(d, 3);
    let p4 = prefix(d, 4);
    match d[0] {
        4 => matches!(len, 13 | 16 | 19),
        5 => (51..=55).contains(&p2) && len == 16,
        2 => (2221..=2720).contains(&p4) && len == 16,
        3 => {
            ((p2 == 34 || p2 == 37) && len == 15)
                || ((3528..=3589).contains(&p4) && (16..=19).contains(&len))
                || ((p2 == 36 || p2 == 38 || p2 == 39 || (300..=305).contains(&p3)) && (14..=19).contains(&len))
        }
        6 => (p4 == 6011 || p2 == 65 || (644..=649).contains(&p3) || p2 == 62) && (16..=19).contains(&len),
        _ => false,
    }
}

pub(crate) fn luhn_valid(d: &[u8]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let x = u32::from(x);
            if i % 2 == 1 {
                let doubled = x * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digits(s: &str) -> Vec<u8> {
        s.bytes().map(|b| b - b'0').collect()
    }

    #[test]
    fn luhn_accepts_known_test_numbers_and_rejects_a_changed_digit() {
        for number in ["4111111111111111", "5555555555554444", "378282246310005", "6011111111111117"] {
            assert!(luhn_valid(&digits(number)), "{number}");
        }
        assert!(!luhn_valid(&digits("4111111111111112")));
        assert!(!luhn_valid(&digits("5555555555554445")));
    }

    #[test]
    fn ssn_rules_follow_the_ssa_allocation() {
        assert!(valid_ssn(&digits("123456789")));
        assert!(!valid_ssn(&digits("000456789")));
        assert!(!valid_ssn(&digits("666456789")));
        assert!(!valid_ssn(&digits("912456789")));
        assert!(!valid_ssn(&digits("123006789")));
        assert!(!valid_ssn(&digits("123450000")));
    }
}
