//! Who calls the API and what they may do: a principal (a bearer token's or a client
//! certificate's name) with one role. Roles are ordered: each may do what the ones below it may.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read and watch jobs, runs, VMs, mappings and readiness.
    Viewer,
    /// And start, end, cancel and resolve failovers; submit, signal and cancel runs.
    Operator,
    /// And change the inventory and the network mappings.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a principal proves who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// `authorization: Bearer <token>`; the store keeps the token's SHA-256 only.
    Token,
    /// A client certificate (mTLS) whose subject common name is the principal's name.
    Certificate,
}

impl Credential {
    pub fn as_str(self) -> &'static str {
        match self {
            Credential::Token => "token",
            Credential::Certificate => "certificate",
        }
    }

    pub fn parse(s: &str) -> Option<Credential> {
        [Credential::Token, Credential::Certificate]
            .into_iter()
            .find(|c| c.as_str() == s)
    }
}

/// An authenticated caller (or, with authentication off, the anonymous one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub role: Role,
}

impl Principal {
    /// The caller of a server that authenticates no one (`--insecure-no-auth`, `tern dev`).
    pub fn anonymous() -> Principal {
        Principal {
            name: "anonymous".into(),
            role: Role::Admin,
        }
    }

    pub fn may(&self, needed: Role) -> bool {
        self.role >= needed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_round_trip() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
        let viewer = Principal {
            name: "v".into(),
            role: Role::Viewer,
        };
        assert!(viewer.may(Role::Viewer) && !viewer.may(Role::Operator));
    }
}
