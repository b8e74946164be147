//! Safety numbers: what two users compare to check that they see each other's real account keys.
//! Derived from the ACCOUNT keys only, so linking or removing a device never changes them. The
//! construction is Signal's numeric fingerprint (version 0, 5200 SHA-512 iterations).

use natter_proto::ids::PhoneNumber;
use sha2::{Digest, Sha512};

/// Fingerprint format version, hashed in first.
const VERSION: u16 = 0;
/// SHA-512 iterations per side.
const ITERATIONS: usize = 5200;

/// One side's 30 digits.
fn displayable_half(phone: &PhoneNumber, account_key: &[u8; 32]) -> String {
    let mut hash = Sha512::new()
        .chain_update(VERSION.to_be_bytes())
        .chain_update(account_key)
        .chain_update(phone.as_str().as_bytes())
        .finalize();
    for _ in 0..ITERATIONS {
        hash = Sha512::new()
            .chain_update(hash)
            .chain_update(account_key)
            .finalize();
    }
    let mut out = String::with_capacity(30);
    for chunk in hash[..30].chunks_exact(5) {
        let value = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        out.push_str(&format!("{:05}", value % 100_000));
    }
    out
}

/// The 60-digit safety number of two accounts: each side's 30 digits, sorted and concatenated, so both
/// users see the same number. It changes only when an account key changes (re-registration).
pub fn safety_number(
    a_phone: &PhoneNumber,
    a_key: &[u8; 32],
    b_phone: &PhoneNumber,
    b_key: &[u8; 32],
) -> String {
    let a = displayable_half(a_phone, a_key);
    let b = displayable_half(b_phone, b_key);
    if a <= b { a + &b } else { b + &a }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phone(s: &str) -> PhoneNumber {
        PhoneNumber::from_e164(s).unwrap()
    }

    #[test]
    fn safety_numbers() {
        let (pa, pb) = (phone("+15550000001"), phone("+15550000002"));
        let (ka, kb) = ([1u8; 32], [2u8; 32]);
        let n = safety_number(&pa, &ka, &pb, &kb);
        assert_eq!(n.len(), 60);
        assert!(n.bytes().all(|c| c.is_ascii_digit()));
        assert_eq!(n, safety_number(&pb, &kb, &pa, &ka), "symmetric");
        assert_eq!(n, safety_number(&pa, &ka, &pb, &kb), "stable");
        assert_ne!(n, safety_number(&pa, &[3u8; 32], &pb, &kb));
        assert_ne!(n, safety_number(&pa, &ka, &pb, &[3u8; 32]));
        // Each half is one side's own digits.
        let half_a = displayable_half(&pa, &ka);
        assert!(n.starts_with(&half_a) || n.ends_with(&half_a));
    }
}
