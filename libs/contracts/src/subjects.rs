//! NATS subject names, built in one place, and the deployment's namespace around them.
//!
//! Subjects are versioned (`proxypool.v1.…`) so that a v2 can run beside v1 during a migration; variable tokens,
//! when a subject has any, come last so that wildcards stay simple.

//!
//! **Namespaces.** Several deployments (staging and production, say) may share one NATS server or cluster. Each sets
//! its own `PROXYPOOL_NAMESPACE`, and every subject it uses becomes `<namespace>.<subject>` ([`subject`]) and every
//! stream, consumer, key-value bucket and object store `<namespace>_<name>` ([`resource`]), so the two never meet.
//! The default, no namespace, keeps today's names. A process serves one deployment: the namespace is set once, when
//! the process connects to NATS ([`set_namespace`]), and read by the few places that talk to NATS (the request
//! client, the router, the JetStream declarations, the lease log, the taken-lease broadcast).

use std::borrow::Cow;
use std::sync::OnceLock;

static NAMESPACE: OnceLock<String> = OnceLock::new();

/// The longest namespace.
pub const NAMESPACE_MAX: usize = 32;

/// Checks a namespace: empty (none), or 1 to [`NAMESPACE_MAX`] of `A–Z a–z 0–9 _ -` (a subject token and a part of
/// a stream name alike).
pub fn check_namespace(ns: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if ns.len() > NAMESPACE_MAX || !ns.chars().all(ok) {
        return Err(format!("must be at most {NAMESPACE_MAX} of A-Z a-z 0-9 _ -"));
    }
    Ok(())
}

/// Sets this process's namespace. Setting the same one again is fine; another one is refused (one process, one
/// deployment).
pub fn set_namespace(ns: &str) -> Result<(), String> {
    check_namespace(ns)?;
    let set = NAMESPACE.get_or_init(|| ns.to_owned());
    if set != ns {
        return Err(format!("this process already serves namespace {set:?}, not {ns:?}"));
    }
    Ok(())
}

/// This process's namespace (empty: none).
pub fn namespace() -> &'static str {
    NAMESPACE.get().map_or("", String::as_str)
}

/// `name` as this deployment's subject: itself without a namespace, `<namespace>.<name>` with one.
pub fn subject(name: &'static str) -> Cow<'static, str> {
    match namespace() {
        "" => Cow::Borrowed(name),
        ns => Cow::Owned(format!("{ns}.{name}")),
    }
}

/// `name` as this deployment's stream, consumer, bucket or object store: itself without a namespace,
/// `<namespace>_<name>` with one.
pub fn resource(name: &'static str) -> Cow<'static, str> {
    match namespace() {
        "" => Cow::Borrowed(name),
        ns => Cow::Owned(format!("{ns}_{name}")),
    }
}

/// Prefix of every subject proxypool owns.
pub const PREFIX: &str = "proxypool.v1";

/// Consumers request a lease here (request-reply). Public contract.
pub const LEASE_ACQUIRE: &str = "proxypool.v1.lease.acquire";
/// Consumers lease several distinct proxies in one commit here, all or none (request-reply). Public contract.
pub const LEASE_ACQUIRE_MANY: &str = "proxypool.v1.lease.acquire_many";
/// Consumers return a lease here (request-reply). Public contract.
pub const LEASE_RELEASE: &str = "proxypool.v1.lease.release";
/// Consumers extend a lease by `LEASE_TTL` here (request-reply). Public contract.
pub const LEASE_RENEW: &str = "proxypool.v1.lease.renew";
/// A holder asks for a new IP: its lease ends and the proxy is rotated now (request-reply). Public contract.
pub const LEASE_ROTATE: &str = "proxypool.v1.lease.rotate";
/// The lease service broadcasts the leases it takes from their holders here (core NATS,
/// [`crate::lease::LeasesTaken`]); the forward door closes their tunnels. Not under `lease.*`, so that a consumer
/// allowed to publish there cannot close other consumers' tunnels.
pub const LEASE_TAKEN: &str = "proxypool.v1.leaseevents.taken";
/// The lease service broadcasts every new ban of an exit IP for a site here (core NATS, [`crate::health::BanEvent`]);
/// the forward door moves the sessions on those proxies off them for that site.
pub const LEASE_BANNED: &str = "proxypool.v1.leaseevents.banned";
/// Consumers report how a proxy they hold (or held moments ago) did for a site, without returning it
/// (request-reply). Public contract.
pub const LEASE_REPORT: &str = "proxypool.v1.lease.report";
/// Wildcard covering every lease subject, for permissions (`deploy/nats/`).
pub const LEASE_ALL: &str = "proxypool.v1.lease.*";

/// The lease log: every change to lease state (grants, returns, locks, catalogue updates), appended by the lease
/// leader in batches (one append per group commit) to the [`LEASE_LOG_STREAM`]. Followers replay it.
pub const LEASE_LOG: &str = "proxypool.v1.leaselog.batch";
/// The JetStream stream holding the [`LEASE_LOG`] (file storage; trimmed once MongoDB holds the projection).
pub const LEASE_LOG_STREAM: &str = "PROXYPOOL_LEASES";
/// JetStream key-value bucket electing the lease leader (one key, renewed while the leader lives).
pub const LEASE_LEADER_BUCKET: &str = "proxypool_lease_leader";

/// Queue group shared by all lease-service replicas, so each request is handled once.
pub const LEASE_QUEUE_GROUP: &str = "proxypool-lease";

/// Register a user (bootstrap or admin). Request-reply, gateway → auth.
pub const AUTH_REGISTER: &str = "proxypool.v1.auth.register";
/// Log in, get a JWT.
pub const AUTH_LOGIN: &str = "proxypool.v1.auth.login";
/// The calling user.
pub const AUTH_ME: &str = "proxypool.v1.auth.me";
/// List users.
pub const AUTH_USERS_LIST: &str = "proxypool.v1.auth.users.list";
/// Create a user (admin).
pub const AUTH_USERS_CREATE: &str = "proxypool.v1.auth.users.create";
/// Update a user (admin).
pub const AUTH_USERS_UPDATE: &str = "proxypool.v1.auth.users.update";
/// Delete a user (admin).
pub const AUTH_USERS_DELETE: &str = "proxypool.v1.auth.users.delete";
/// Every auth subject, for subscription and permissions.
pub const AUTH_ALL: [&str; 7] =
    [AUTH_REGISTER, AUTH_LOGIN, AUTH_ME, AUTH_USERS_LIST, AUTH_USERS_CREATE, AUTH_USERS_UPDATE, AUTH_USERS_DELETE];
/// Queue group of the auth replicas.
pub const AUTH_QUEUE_GROUP: &str = "proxypool-auth";

/// JetStream subject of rotation jobs (WorkQueue stream [`ROTATION_STREAM`]).
pub const ROTATION_JOBS: &str = "proxypool.v1.rotation.jobs";
/// The WorkQueue stream holding rotation jobs.
pub const ROTATION_STREAM: &str = "PROXYPOOL_ROTATIONS";
/// The durable pull consumer shared by rotator workers.
pub const ROTATION_CONSUMER: &str = "rotator-workers";
/// Admin request to rotate one proxy now (request-reply, gateway → rotator).
pub const ROTATOR_ROTATE_NOW: &str = "proxypool.v1.rotator.rotate";
/// Queue group of the rotator replicas.
pub const ROTATOR_QUEUE_GROUP: &str = "proxypool-rotator";
/// Rotator → lease service after a stored successful rotation: reset the lease state and make the proxy leasable.
/// Not under `lease.*`, so that a consumer identity allowed `lease.*` cannot reset leases.
pub const LEASECTL_ROTATED: &str = "proxypool.v1.leasectl.rotated";

/// JetStream subject of consumer callback notices (WorkQueue stream [`CALLBACK_STREAM`]).
pub const CALLBACKS: &str = "proxypool.v1.callbacks.deliver";
/// The WorkQueue stream holding callback notices until delivered.
pub const CALLBACK_STREAM: &str = "PROXYPOOL_CALLBACKS";
/// The durable pull consumer of the callback senders.
pub const CALLBACK_CONSUMER: &str = "callback-senders";
/// Gateway, importer and rotator → lease service after they change proxies in MongoDB: re-read them (or the whole
/// catalogue) and apply the change to lease state before answering.
pub const LEASECTL_SYNC: &str = "proxypool.v1.leasectl.sync";
/// Rotator → lease service: lock a proxy for rotation (no new leases), or check the lock and its holders.
pub const LEASECTL_LOCK: &str = "proxypool.v1.leasectl.lock";
/// Gateway → lease service (admin): lift a ban of a proxy's exit IP for a site, or its quarantine.
pub const LEASECTL_HEAL: &str = "proxypool.v1.leasectl.heal";
/// Gateway → lease service (admin): one proxy's live lease state (leases, lock, health) from the engine.
pub const LEASECTL_INSPECT: &str = "proxypool.v1.leasectl.inspect";

/// Gateway → importer: import an uploaded spreadsheet (request-reply; the file itself is in the
/// [`IMPORT_UPLOADS_BUCKET`] object store).
pub const IMPORT_EXCEL: &str = "proxypool.v1.importer.excel";
/// Gateway → importer: import the KiotProxy keys.
pub const IMPORT_KIOT: &str = "proxypool.v1.importer.kiot";
/// Gateway → importer: import the active ZingProxy proxies.
pub const IMPORT_ZING: &str = "proxypool.v1.importer.zing";
/// Gateway → importer: the state of an import job.
pub const IMPORT_STATUS: &str = "proxypool.v1.importer.status";
/// Every importer request subject.
pub const IMPORT_ALL: [&str; 4] = [IMPORT_EXCEL, IMPORT_KIOT, IMPORT_ZING, IMPORT_STATUS];
/// Queue group of the importer replicas.
pub const IMPORTER_QUEUE_GROUP: &str = "proxypool-importer";
/// JetStream object store bucket holding uploaded spreadsheets until their import has read them.
pub const IMPORT_UPLOADS_BUCKET: &str = "proxypool_import_uploads";
/// JetStream key-value bucket of the importer's locks (one import at a time; the ZingProxy schedule).
pub const IMPORT_LOCKS_BUCKET: &str = "proxypool_importer_locks";

/// Request header: when the caller stops waiting, in Unix milliseconds. A service does not start a request whose
/// caller has already given up (one published while NATS was down reaches it only after the reconnection), and
/// answers within it. Hosts' clocks must agree to well under the request timeout (NTP), as for token expiry.
pub const DEADLINE_HEADER: &str = "Proxypool-Deadline";
