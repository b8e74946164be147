//! Phone-number registration: issuing SMS codes and checking them, with the limits that keep SMS costs and
//! code guessing in check (per-code attempts, resend cooldown, per-number and per-IP windows).

pub mod gateway;
pub mod ratelimit;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use natter_proto::PhoneNumber;
use natter_proto::limits::CODE_DIGITS;
use natter_proto::wire::{CodeSent, Error, ErrorCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::RegistrationLimits;
use crate::store::{CodeRecord, Store};
pub use gateway::{GatewayError, SmsGateway};
use ratelimit::RateLimiter;

const HOUR: Duration = Duration::from_secs(3600);

/// Issues and checks registration codes.
pub struct Registration {
    gateway: Box<dyn SmsGateway>,
    limits: RegistrationLimits,
    per_number: RateLimiter<PhoneNumber>,
    per_ip_codes: RateLimiter<IpAddr>,
    per_ip_verifies: RateLimiter<IpAddr>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn rate_limited(what: &str, wait: Duration) -> Error {
    let mut e = Error::new(
        ErrorCode::RateLimited,
        format!("too many {what}; try again in {} s", wait.as_secs().max(1)),
    );
    e.retry_after_ms = wait.as_millis() as u64;
    e
}

fn internal(e: impl std::fmt::Display) -> Error {
    tracing::warn!(error = %e, "registration store failure");
    Error::new(
        ErrorCode::Unavailable,
        "the server could not complete the request; retry",
    )
}

/// SHA-256 over the number and the code: the store never holds a code in the clear.
fn hash_code(phone: &PhoneNumber, code: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"natter/sms-code/v1\0");
    h.update(phone.as_str().as_bytes());
    h.update(b"\0");
    h.update(code.as_bytes());
    h.finalize().into()
}

/// A uniformly random code of [`CODE_DIGITS`] digits.
fn random_code() -> Result<String, getrandom::Error> {
    let modulus = 10u32.pow(CODE_DIGITS as u32);
    // Rejection sampling keeps every code equally likely.
    let limit = u32::MAX - (u32::MAX % modulus);
    loop {
        let mut b = [0u8; 4];
        getrandom::fill(&mut b)?;
        let v = u32::from_le_bytes(b);
        if v < limit {
            return Ok(format!("{:0width$}", v % modulus, width = CODE_DIGITS));
        }
    }
}

impl Registration {
    /// A registration service sending codes through `gateway`.
    pub fn new(gateway: Box<dyn SmsGateway>, limits: RegistrationLimits) -> Self {
        Self {
            per_number: RateLimiter::new(limits.codes_per_number_per_hour, HOUR),
            per_ip_codes: RateLimiter::new(limits.codes_per_ip_per_hour, HOUR),
            per_ip_verifies: RateLimiter::new(limits.verifies_per_ip_per_hour, HOUR),
            gateway,
            limits,
        }
    }

    /// Sends a fresh code to `phone`, replacing any pending one.
    pub async fn request_code(
        &self,
        store: &dyn Store,
        phone: &PhoneNumber,
        ip: IpAddr,
        now_ms: u64,
    ) -> Result<CodeSent, Error> {
        if let Some(pending) = store.get_code(phone).await.map_err(internal)? {
            let next = pending.sent_at_ms + self.limits.resend_cooldown.as_millis() as u64;
            if now_ms < next {
                return Err(rate_limited(
                    "code requests for this number",
                    Duration::from_millis(next - now_ms),
                ));
            }
        }
        let now = Instant::now();
        self.per_ip_codes
            .check(&ip, now)
            .map_err(|w| rate_limited("code requests from this address", w))?;
        self.per_number
            .check(phone, now)
            .map_err(|w| rate_limited("codes sent to this number", w))?;
        let code = random_code().map_err(internal)?;
        let record = CodeRecord {
            phone: phone.clone(),
            code_hash: hash_code(phone, &code),
            sent_at_ms: now_ms,
            expires_at_ms: now_ms + self.limits.code_ttl.as_millis() as u64,
            attempts: 0,
        };
        store.save_code(&record).await.map_err(internal)?;
        if let Err(e) = self.gateway.send_code(phone, &code).await {
            tracing::warn!(error = %e, "SMS gateway failed");
            // A code nobody received must not block the next request behind the cooldown.
            let _ = store.remove_code(phone).await;
            return Err(Error::new(
                ErrorCode::SmsFailed,
                "the code could not be sent by SMS; try again later",
            ));
        }
        tracing::info!("registration code sent");
        Ok(CodeSent {
            expires_in_s: self.limits.code_ttl.as_secs() as u32,
            resend_after_s: self.limits.resend_cooldown.as_secs() as u32,
        })
    }

    /// Checks a code. On success the code stays pending until [`Registration::consume`], so that a
    /// failure to create the account lets the user retry with the same code.
    pub async fn check_code(
        &self,
        store: &dyn Store,
        phone: &PhoneNumber,
        code: &str,
        ip: IpAddr,
        now_ms: u64,
    ) -> Result<(), Error> {
        self.per_ip_verifies
            .check(&ip, Instant::now())
            .map_err(|w| rate_limited("verification attempts from this address", w))?;
        let Some(pending) = store.get_code(phone).await.map_err(internal)? else {
            return Err(Error::new(
                ErrorCode::NoCodePending,
                format!("no code is pending for {phone}: run register first"),
            ));
        };
        if now_ms >= pending.expires_at_ms {
            store.remove_code(phone).await.map_err(internal)?;
            return Err(Error::new(
                ErrorCode::CodeExpired,
                "the code has expired: request a new one with register",
            ));
        }
        if pending.attempts >= self.limits.max_attempts {
            store.remove_code(phone).await.map_err(internal)?;
            return Err(Error::new(
                ErrorCode::TooManyAttempts,
                "too many wrong codes: request a new one with register",
            ));
        }
        let well_formed = code.len() == CODE_DIGITS && code.bytes().all(|b| b.is_ascii_digit());
        let matches = well_formed && bool::from(hash_code(phone, code).ct_eq(&pending.code_hash));
        if matches {
            return Ok(());
        }
        let attempts = store.add_code_attempt(phone).await.map_err(internal)?;
        let left = self.limits.max_attempts.saturating_sub(attempts);
        if left == 0 {
            store.remove_code(phone).await.map_err(internal)?;
            return Err(Error::new(
                ErrorCode::TooManyAttempts,
                "wrong code, and that was the last attempt: request a new one with register",
            ));
        }
        Err(Error::new(
            ErrorCode::WrongCode,
            format!("wrong code ({left} attempts left)"),
        ))
    }

    /// Burns the code after the account was created.
    pub async fn consume(&self, store: &dyn Store, phone: &PhoneNumber) -> Result<(), Error> {
        store.remove_code(phone).await.map_err(internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_six_digits() {
        for _ in 0..100 {
            let c = random_code().unwrap();
            assert_eq!(c.len(), 6);
            assert!(c.bytes().all(|b| b.is_ascii_digit()));
        }
    }

    #[test]
    fn code_hash_binds_the_number() {
        let a = PhoneNumber::from_e164("+15550000001").unwrap();
        let b = PhoneNumber::from_e164("+15550000002").unwrap();
        assert_ne!(hash_code(&a, "123456"), hash_code(&b, "123456"));
        assert_ne!(hash_code(&a, "123456"), hash_code(&a, "123457"));
    }
}
