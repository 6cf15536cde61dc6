//! Authentication and roles, checked in one place for every RPC: the gate in front of the
//! services ([`super::gate`]) finds the caller's principal (a bearer token, or a client certificate's subject
//! common name), checks the role the method needs ([`required_role`]) and hands the principal
//! to the handler in the request's extensions, so what the RPC journals names who asked.
//!
//! Tokens are 256 random bits; the store keeps their SHA-256 only. A token or a name is never
//! logged or sent back.

use std::sync::Arc;

use base64::Engine as _;
use sha2::{Digest, Sha256};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use super::error::ApiError;
use crate::domain::auth::{Credential, Principal, Role};
use crate::store::{PrincipalRow, PrincipalStore};

/// What a token looks like: this prefix, then 43 base64url characters.
pub const TOKEN_PREFIX: &str = "tern_";

/// A new random token (shown once, to the operator who creates it).
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The hash a token is stored and looked up by: SHA-256, hex.
pub fn token_sha256(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The role a gRPC method needs, by its path (`/package.Service/Method`); None for the methods
/// anyone may call (health, for load balancers and probes). An unknown method needs admin.
pub fn required_role(path: &str) -> Option<Role> {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    match service {
        "grpc.health.v1.Health" => None,
        "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection" => Some(Role::Viewer),
        "tern.v1.FailoverService" => Some(match method {
            "StartTestFailover" | "StartLiveFailover" | "EndTestFailover" | "CancelFailover" | "ResolveFailover" => {
                Role::Operator
            }
            "GetFailover" | "ListFailovers" | "WatchFailover" | "CheckReadiness" | "GetVm" | "ListVms"
            | "GetNetworkMappings" => Role::Viewer,
            _ => Role::Admin,
        }),
        "tern.v1.WorkflowService" => Some(match method {
            "SubmitWorkflow" | "SignalWorkflow" | "CancelWorkflow" => Role::Operator,
            "GetWorkflow" | "ListWorkflows" | "WatchWorkflow" | "ListDefinitions" => Role::Viewer,
            _ => Role::Admin,
        }),
        _ => Some(Role::Admin),
    }
}

/// How a server authenticates its callers.
#[derive(Clone)]
pub enum Authenticator {
    /// No one: every caller may do everything (`--insecure-no-auth`, `tern dev`), and the
    /// journal names no one.
    Off,
    /// Bearer tokens and, with `certificates`, client-certificate names, looked up in `store`.
    Principals {
        store: Arc<dyn PrincipalStore>,
        certificates: bool,
    },
}

impl Authenticator {
    /// The principal of a request to `path`, allowed to call it; None when no one is
    /// authenticated (and everything is allowed).
    pub async fn check(&self, req: &http::request::Parts) -> Result<Option<Principal>, ApiError> {
        let path = req.uri.path();
        let Some(needed) = required_role(path) else {
            return Ok(None);
        };
        // A token, when sent, decides; the certificate is read only without one.
        let certificate = match self {
            Authenticator::Principals { certificates: true, .. }
                if !req.headers.contains_key(http::header::AUTHORIZATION) =>
            {
                certificate_name(req)
            }
            _ => None,
        };
        let method = path.rsplit('/').next().unwrap_or(path);
        self.check_role(&req.headers, certificate.as_deref(), needed, method)
            .await
    }

    /// The principal of a request with `headers` (and the verified client certificate's name,
    /// if any), allowed if its role is `needed` or above; `what` names what it asked for in a
    /// refusal. None when no one is authenticated (and everything is allowed).
    pub async fn check_role(
        &self,
        headers: &http::HeaderMap,
        certificate: Option<&str>,
        needed: Role,
        what: &str,
    ) -> Result<Option<Principal>, ApiError> {
        let Authenticator::Principals { store, certificates } = self else {
            return Ok(None);
        };
        let certificate = certificate.filter(|_| *certificates);
        let row = match bearer(headers)? {
            Some(token) => store
                .principal_by_token(&token_sha256(token))
                .await?
                .ok_or_else(|| ApiError::Unauthenticated("the token is unknown or revoked".into()))?,
            None => {
                let Some(name) = certificate else {
                    return Err(ApiError::Unauthenticated(
                        "authentication required: send `authorization: Bearer <token>` (tern token create) \
                         or a client certificate"
                            .into(),
                    ));
                };
                store.principal_by_certificate(name).await?.ok_or_else(|| {
                    let name = crate::domain::limits::shown(name);
                    ApiError::Unauthenticated(format!(
                        "the client certificate's name {name} is not a principal (tern token create {name} --certificate)"
                    ))
                })?
            }
        };
        let principal = principal_of(&row);
        if !principal.may(needed) {
            return Err(ApiError::PermissionDenied(format!(
                "{} ({}) may not call {what}: it needs the {needed} role",
                principal.name, principal.role
            )));
        }
        Ok(Some(principal))
    }
}

fn principal_of(row: &PrincipalRow) -> Principal {
    Principal {
        name: row.name.clone(),
        role: row.role,
    }
}

/// The bearer token of `authorization`, if the request has one.
fn bearer(headers: &http::HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthenticated("the authorization header is not text".into()))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
            Ok(Some(token.trim()))
        }
        _ => Err(ApiError::Unauthenticated(
            "the authorization header must be `Bearer <token>`".into(),
        )),
    }
}

/// The subject common name of the client certificate the TLS handshake verified: gRPC's
/// own handshake, or the REST listener's (which hands it to its in-process call).
fn certificate_name(req: &http::request::Parts) -> Option<String> {
    if let Some(VerifiedCertificate(name)) = req.extensions.get::<VerifiedCertificate>() {
        return Some(name.clone());
    }
    let certs = req
        .extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())?;
    common_name(certs.first()?.as_ref())
}

/// The subject common name of a DER certificate.
pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(name)
}

/// The common name of a client certificate another listener of this process verified (the
/// REST API's TLS), carried in a request's extensions; never read from the network.
#[derive(Clone, Debug)]
pub(crate) struct VerifiedCertificate(pub(crate) String);

/// The name of the principal a handler's request came from (None without authentication).
pub(crate) fn caller<T>(req: &tonic::Request<T>) -> Option<String> {
    req.extensions().get::<Principal>().map(|p| p.name.clone())
}

/// A row for a new principal: a token's (with the token to show once) or a certificate's.
pub fn new_principal(
    name: &str,
    role: Role,
    credential: Credential,
    now: crate::domain::Timestamp,
) -> (PrincipalRow, Option<String>) {
    let token = (credential == Credential::Token).then(new_token);
    let row = PrincipalRow {
        name: name.to_string(),
        role,
        credential,
        token_sha256: token.as_deref().map(token_sha256),
        created_at: now,
        revoked_at: None,
    };
    (row, token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_has_its_role() {
        assert_eq!(required_role("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            required_role("/tern.v1.FailoverService/StartLiveFailover"),
            Some(Role::Operator)
        );
        assert_eq!(
            required_role("/tern.v1.FailoverService/ListFailovers"),
            Some(Role::Viewer)
        );
        assert_eq!(required_role("/tern.v1.FailoverService/UpsertVm"), Some(Role::Admin));
        assert_eq!(
            required_role("/tern.v1.WorkflowService/SignalWorkflow"),
            Some(Role::Operator)
        );
        assert_eq!(required_role("/tern.v1.WorkflowService/Nope"), Some(Role::Admin));
        assert_eq!(required_role("/other.Service/X"), Some(Role::Admin));
    }

    #[test]
    fn tokens_are_random_and_stored_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 43, "{a}");
        let (row, token) = new_principal("ci", Role::Viewer, Credential::Token, crate::domain::Timestamp(0));
        let token = token.unwrap();
        assert_eq!(row.token_sha256, Some(token_sha256(&token)));
        assert_ne!(row.token_sha256.as_deref(), Some(token.as_str()));
        let (row, token) = new_principal(
            "host",
            Role::Admin,
            Credential::Certificate,
            crate::domain::Timestamp(0),
        );
        assert!(token.is_none() && row.token_sha256.is_none());
    }
}
