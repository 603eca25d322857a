//! Bearer-token authentication of the admin service.

use std::sync::Arc;

use tonic::{Request, Status};

/// The environment variable that supplies the admin token when `--admin-token` is absent
/// (also read by `irctl`).
pub const TOKEN_ENV: &str = "INDEXRELAY_ADMIN_TOKEN";

/// The admin token to require: the flag's value, else [`TOKEN_ENV`]; an empty value means
/// none (the admin API is then open, as on a developer machine).
pub fn resolve_token(flag: Option<String>) -> Option<String> {
    flag.or_else(|| std::env::var(TOKEN_ENV).ok()).filter(|t| !t.is_empty())
}

/// A tonic interceptor that lets a call through only with `authorization: Bearer <token>`
/// when a token is configured.
#[derive(Clone)]
pub struct BearerAuth {
    token: Option<Arc<str>>,
}

impl BearerAuth {
    /// Requires `token` when it is `Some`.
    pub fn new(token: Option<&str>) -> Self {
        BearerAuth {
            token: token.map(Arc::from),
        }
    }

    /// Checks one call's metadata.
    pub fn check<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.token else { return Ok(()) };
        let Some(value) = req.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "the admin API needs a token: send `authorization: Bearer <token>` (irctl --token or INDEXRELAY_ADMIN_TOKEN)",
            ));
        };
        let given = value.to_str().unwrap_or("");
        let given = given
            .strip_prefix("Bearer ")
            .or_else(|| given.strip_prefix("bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return Err(Status::unauthenticated("invalid admin token"));
        }
        Ok(())
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.check(&req)?;
        Ok(req)
    }
}

/// Compares without an early exit, so the time taken does not reveal how much of a guessed
/// token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(value: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(v) = value {
            r.metadata_mut().insert("authorization", v.parse().unwrap());
        }
        r
    }

    #[test]
    fn bearer_token_is_required_only_when_configured() {
        let open = BearerAuth::new(None);
        assert!(open.check(&with_auth(None)).is_ok());
        let auth = BearerAuth::new(Some("s3cret"));
        assert!(auth.check(&with_auth(Some("Bearer s3cret"))).is_ok());
        for bad in [None, Some("Bearer wrong"), Some("s3cret"), Some("Bearer s3cre")] {
            let e = auth.check(&with_auth(bad)).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!(auth.check(&with_auth(None)).unwrap_err().message().contains("token"));
    }
}
