//! Every request-reply endpoint, each declared once as a type.
//!
//! An [`Endpoint`] ties a subject to its request and reply types, so a caller (`proxypool_rpc::call::<E>`) and a
//! server (`proxypool_rpc::Router::on::<E>`) cannot disagree on either: the compiler checks both ends against this
//! one declaration.
//!
//! The subject strings themselves stay in [`crate::subjects`] (they are also needed for NATS permissions and
//! docs); this module is the only place that pairs them with types.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::auth::{
    Deleted, ListUsersRequest, LoginReply, LoginRequest, RegisterRequest, UpdateUserRequest, UserIdRequest, UserPage,
    UserView,
};
use crate::import::{ExcelImportRequest, ImportJob, JobStatusRequest, ProviderImportRequest};
use crate::lease::{
    AcquireRequest, LeaseGrant, LeaseGrants, ReleaseOutcome, ReleaseRequest, RenewOutcome, RenewRequest,
};
use crate::rotation::{
    LockReply, LockRequest, RotateNowReply, RotateNowRequest, RotatedReply, RotatedRequest, SyncReply, SyncRequest,
};
use crate::subjects;

/// A request-reply endpoint: one subject, one request type, one reply type (inside the [`crate::Reply`] envelope).
pub trait Endpoint: Send + Sync + 'static {
    /// The subject the request is sent on.
    const SUBJECT: &'static str;
    /// Whether the server refuses to start a request whose caller has already given up (its deadline header has
    /// passed). True for requests whose late effect would be wrong (a grant nobody receives); false for idempotent
    /// maintenance whose late run still helps.
    const BOUNDED_BY_CALLER: bool = false;
    /// Longest the server lets one request run, when it differs from the service's default (work that is long by
    /// nature, such as re-reading a whole catalogue).
    const DEADLINE: Option<std::time::Duration> = None;
    /// The request body.
    type Request: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// The reply body on success.
    type Reply: Serialize + DeserializeOwned + Send + Sync + 'static;
}

macro_rules! endpoint {
    ($(#[$doc:meta])* $name:ident, $subject:expr, $req:ty => $reply:ty $(, bounded = $bounded:expr)? $(, deadline = $deadline:expr)?) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $name;
        impl Endpoint for $name {
            const SUBJECT: &'static str = $subject;
            $(const BOUNDED_BY_CALLER: bool = $bounded;)?
            $(const DEADLINE: Option<std::time::Duration> = Some($deadline);)?
            type Request = $req;
            type Reply = $reply;
        }
    };
}

endpoint!(
    /// Lease a proxy (public contract). Bounded by the caller's deadline: a grant its caller gave up on is not made.
    LeaseAcquire, subjects::LEASE_ACQUIRE, AcquireRequest => LeaseGrant, bounded = true
);
endpoint!(
    /// Lease `count` distinct proxies in one commit, all or none (public contract). Bounded like [`LeaseAcquire`].
    LeaseAcquireMany, subjects::LEASE_ACQUIRE_MANY, AcquireRequest => LeaseGrants, bounded = true
);
endpoint!(
    /// Report an outcome for a proxy one holds or held moments ago, without returning it (public contract).
    LeaseReport, subjects::LEASE_REPORT, crate::health::ReportRequest => crate::health::ReportOutcome
);
endpoint!(
    /// Return a lease (public contract). Idempotent.
    LeaseRelease, subjects::LEASE_RELEASE, ReleaseRequest => ReleaseOutcome
);

endpoint!(
    /// Extend a lease by `LEASE_TTL` (public contract). Idempotent.
    LeaseRenew, subjects::LEASE_RENEW, RenewRequest => RenewOutcome
);
endpoint!(
    /// End one's lease and rotate the proxy now (public contract): a holder asks for a new IP.
    LeaseRotate, subjects::LEASE_ROTATE, RenewRequest => crate::lease::RotateOutcome
);
endpoint!(
    /// Rotator → lease service after a stored rotation: reset the lease state and unlock.
    LeaseCtlRotated, subjects::LEASECTL_ROTATED, RotatedRequest => RotatedReply
);
endpoint!(
    /// Gateway, importer, rotator → lease service after a change to proxies in MongoDB: apply it before answering.
    LeaseCtlSync, subjects::LEASECTL_SYNC, SyncRequest => SyncReply, deadline = std::time::Duration::from_secs(110)
);
endpoint!(
    /// Rotator → lease service: take or check the rotation lock (and the holders the drain waits for).
    LeaseCtlLock, subjects::LEASECTL_LOCK, LockRequest => LockReply
);
endpoint!(
    /// Gateway → lease service (admin): lift a ban of a proxy's exit IP for a site, or its quarantine.
    LeaseCtlHeal, subjects::LEASECTL_HEAL, crate::health::HealRequest => crate::health::HealReply
);
endpoint!(
    /// Gateway → lease service (admin): one proxy's live lease state.
    LeaseCtlInspect, subjects::LEASECTL_INSPECT, crate::health::InspectRequest => crate::health::LiveState
);
endpoint!(
    /// Register a user (bootstrap policy applies).
    AuthRegister, subjects::AUTH_REGISTER, RegisterRequest => UserView
);
endpoint!(
    /// Log in.
    AuthLogin, subjects::AUTH_LOGIN, LoginRequest => LoginReply
);
endpoint!(
    /// The calling user.
    AuthMe, subjects::AUTH_ME, UserIdRequest => UserView
);
endpoint!(
    /// List users.
    AuthUsersList, subjects::AUTH_USERS_LIST, ListUsersRequest => UserPage
);
endpoint!(
    /// Create a user (admin).
    AuthUsersCreate, subjects::AUTH_USERS_CREATE, RegisterRequest => UserView
);
endpoint!(
    /// Update a user (admin).
    AuthUsersUpdate, subjects::AUTH_USERS_UPDATE, UpdateUserRequest => UserView
);
endpoint!(
    /// Delete a user (admin).
    AuthUsersDelete, subjects::AUTH_USERS_DELETE, UserIdRequest => Deleted
);
endpoint!(
    /// Admin: rotate one proxy now.
    RotateNow, subjects::ROTATOR_ROTATE_NOW, RotateNowRequest => RotateNowReply
);
endpoint!(
    /// Import an uploaded spreadsheet.
    ImportExcel, subjects::IMPORT_EXCEL, ExcelImportRequest => ImportJob
);
endpoint!(
    /// Import the KiotProxy keys.
    ImportKiot, subjects::IMPORT_KIOT, ProviderImportRequest => ImportJob
);
endpoint!(
    /// Import the active ZingProxy proxies.
    ImportZing, subjects::IMPORT_ZING, ProviderImportRequest => ImportJob
);
endpoint!(
    /// The state of an import job.
    ImportStatus, subjects::IMPORT_STATUS, JobStatusRequest => ImportJob
);
