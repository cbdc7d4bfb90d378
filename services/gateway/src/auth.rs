//! API-key authentication. Keys are compared by SHA-256 digest in constant time, so neither the
//! secret nor timing reveals anything. This issue knows one key, the bootstrap owner key from
//! `MESHGATE_ADMIN_KEY`; stored, scoped keys arrive with the tenancy issue.

use meshgate_proto::common::v1::{Principal, Role};
use meshgate_runtime::{ApiError, ErrorCode};
use sha2::{Digest, Sha256};

/// Identifier (not secret) of the bootstrap owner key, used in quota scopes and traces.
pub const ADMIN_KEY_ID: &str = "admin";

/// Resolves bearer tokens to principals.
#[derive(Clone)]
pub struct Authenticator {
    admin_digest: Option<[u8; 32]>,
}

impl Authenticator {
    pub fn new(admin_key: Option<&str>) -> Self {
        Self { admin_digest: admin_key.filter(|k| !k.is_empty()).map(digest) }
    }

    /// The principal for the `Authorization` header value, or a 401.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, ApiError> {
        let Some(value) = authorization else {
            return Err(ApiError::new(
                ErrorCode::Unauthenticated,
                "missing API key: send `Authorization: Bearer <key>`",
            ));
        };
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::new(ErrorCode::Unauthenticated, "malformed Authorization header: expected `Bearer <key>`")
            })?;
        let presented = digest(token);
        match &self.admin_digest {
            Some(admin) if constant_time_eq(admin, &presented) => Ok(Principal {
                org_id: "default".into(),
                project_id: "default".into(),
                user_id: "admin".into(),
                key_id: ADMIN_KEY_ID.into(),
                role: Role::Owner as i32,
            }),
            _ => Err(ApiError::new(ErrorCode::Unauthenticated, "invalid API key")),
        }
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_key_authenticates_as_owner() {
        let auth = Authenticator::new(Some("sk-admin"));
        let principal = auth.authenticate(Some("Bearer sk-admin")).unwrap();
        assert_eq!(principal.role, Role::Owner as i32);
        assert_eq!(principal.key_id, ADMIN_KEY_ID);
    }

    #[test]
    fn missing_malformed_and_wrong_keys_are_401() {
        let auth = Authenticator::new(Some("sk-admin"));
        for header in [None, Some("sk-admin"), Some("Bearer "), Some("Bearer sk-admin2"), Some("Basic x")] {
            assert_eq!(auth.authenticate(header).unwrap_err().code, ErrorCode::Unauthenticated, "{header:?}");
        }
        let no_key = Authenticator::new(None);
        assert!(no_key.authenticate(Some("Bearer anything")).is_err());
        assert!(Authenticator::new(Some("")).authenticate(Some("Bearer ")).is_err());
    }
}
