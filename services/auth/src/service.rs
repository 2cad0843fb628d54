//! Users, registration policy and logins against MongoDB.

use std::time::Duration;

use bson::oid::ObjectId;
use bson::{doc, DateTime, Document};
use chrono::{TimeZone, Utc};
use futures::TryStreamExt;
use proxypool_contracts::auth::{
    Caller, Deleted, ListUsersRequest, LoginReply, LoginRequest, NewUser, UserPage, UserPatch, UserView,
};
use proxypool_contracts::{ApiError, ErrorCode, ObjectIdHex};
use proxypool_settings::Secret;
use proxypool_store::model::UserDoc;
use proxypool_store::{Store, StoreError};

/// The auth logic.
#[derive(Debug, Clone)]
pub struct AuthService {
    store: Store,
    secret: Secret<String>,
    cost: u32,
    allow_registration: bool,
    ttl: Duration,
    /// A hash at the configured cost, verified against when the email is unknown so that a failed login takes as
    /// long whether or not the account exists.
    dummy_hash: String,
}

fn iso(d: DateTime) -> chrono::DateTime<Utc> {
    Utc.timestamp_millis_opt(d.timestamp_millis()).single().unwrap_or_default()
}

fn view(u: &UserDoc) -> UserView {
    UserView {
        id: u.id.to_hex(),
        email: u.email.clone(),
        username: u.username.clone(),
        created_at: iso(u.created_at),
        updated_at: iso(u.updated_at),
    }
}

fn db(e: impl Into<StoreError>) -> ApiError {
    e.into().into_api("a user with this email or username")
}

/// Trims and lowercases an email and checks its shape (`local@domain.tld`, no spaces, at most 254 characters).
pub fn valid_email(raw: &str) -> Result<String, ApiError> {
    let e = raw.trim().to_ascii_lowercase();
    let ok = e.len() <= 254
        && !e.chars().any(|c| c.is_whitespace() || c.is_control())
        && e.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !domain.contains("..")
        });
    if ok {
        Ok(e)
    } else {
        Err(ApiError::invalid("email", "is not a valid email address"))
    }
}

fn valid_username(raw: &str) -> Result<String, ApiError> {
    let u = raw.trim();
    let ok = (3..=64).contains(&u.chars().count())
        && u.chars().all(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '));
    if ok {
        Ok(u.to_owned())
    } else {
        Err(ApiError::invalid("username", "must be 3 to 64 letters, digits, spaces or _ - ."))
    }
}

fn valid_password(p: &str) -> Result<(), ApiError> {
    // bcrypt ignores everything after 72 bytes; refuse rather than silently truncate.
    if (8..=72).contains(&p.len()) {
        Ok(())
    } else {
        Err(ApiError::invalid("password", "must be 8 to 72 bytes long"))
    }
}

fn oid(field: &str, raw: &str) -> Result<ObjectId, ApiError> {
    let hex = ObjectIdHex::parse_field(field, Some(raw))?;
    ObjectId::parse_str(hex.as_str()).map_err(|_| ApiError::invalid(field, "is not a valid ObjectId"))
}

impl AuthService {
    /// A service over `store`.
    pub fn new(
        store: Store,
        secret: Secret<String>,
        cost: u32,
        allow_registration: bool,
        ttl: Duration,
    ) -> Result<Self, bcrypt::BcryptError> {
        let dummy_hash = bcrypt::hash(bson::oid::ObjectId::new().to_hex(), cost)?;
        Ok(Self { store, secret, cost, allow_registration, ttl, dummy_hash })
    }

    async fn hash(&self, password: String) -> Result<String, ApiError> {
        let cost = self.cost;
        // bcrypt is deliberately slow: keep it off the async workers.
        tokio::task::spawn_blocking(move || bcrypt::hash(password, cost))
            .await
            .map_err(|e| ApiError::internal(format!("hashing task failed: {e}")))?
            .map_err(|e| ApiError::internal(format!("cannot hash the password: {e}")))
    }

    async fn check_unique(
        &self,
        email: Option<&str>,
        username: Option<&str>,
        except: Option<ObjectId>,
    ) -> Result<(), ApiError> {
        let users = self.store.users().clone_with_type::<Document>();
        for (field, value) in [("email", email), ("username", username)] {
            let Some(value) = value else { continue };
            let found = users.find_one(doc! { field: value }).projection(doc! { "_id": 1 }).await.map_err(db)?;
            if let Some(d) = found {
                if d.get_object_id("_id").ok() != except {
                    let mut e = ApiError::new(ErrorCode::Conflict, format!("{field} {value:?} is already in use"));
                    e.field = Some(field.to_owned());
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Registers a user. Without an admin caller this is allowed only for the very first user (bootstrap), or when
    /// `ALLOW_REGISTRATION=true`.
    pub async fn register(&self, user: NewUser, caller: &Caller) -> Result<UserView, ApiError> {
        let email = valid_email(&user.email)?;
        let username = valid_username(&user.username)?;
        valid_password(&user.password)?;
        if !caller.admin && !self.allow_registration {
            let existing = self.store.users().estimated_document_count().await.map_err(db)?;
            if existing > 0 {
                return Err(ApiError::new(
                    ErrorCode::Unauthorized,
                    "registration is closed: an admin must register new users (or set ALLOW_REGISTRATION=true)",
                ));
            }
        }
        self.check_unique(Some(&email), Some(&username), None).await?;
        let password = self.hash(user.password).await?;
        let now = DateTime::now();
        let doc = UserDoc { id: ObjectId::new(), email, username, password, created_at: now, updated_at: now };
        self.store.users().insert_one(&doc).await.map_err(db)?;
        tracing::info!(user = %doc.id, "user registered");
        Ok(view(&doc))
    }

    /// Checks a password and issues a token. The error does not say which of email or password was wrong.
    pub async fn login(&self, req: LoginRequest) -> Result<LoginReply, ApiError> {
        let refused = || ApiError::new(ErrorCode::Unauthorized, "invalid email or password");
        let email = req.email.trim().to_ascii_lowercase();
        let user = self.store.users().find_one(doc! { "email": &email }).await.map_err(db)?;
        let hash = user.as_ref().map_or_else(|| self.dummy_hash.clone(), |u| u.password.clone());
        let password = req.password;
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
            .await
            .unwrap_or(false);
        let user = match user {
            Some(u) if ok => u,
            _ => return Err(refused()),
        };
        let (token, claims) = proxypool_authn::issue(self.secret.expose(), &user.id.to_hex(), self.ttl)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let expires_at =
            Utc.timestamp_opt(i64::try_from(claims.exp).unwrap_or(i64::MAX), 0).single().unwrap_or_default();
        Ok(LoginReply { token, token_type: "Bearer".to_owned(), expires_at, user: view(&user) })
    }

    /// The user with `id`.
    pub async fn get(&self, id: &str) -> Result<UserView, ApiError> {
        let id = oid("id", id)?;
        let user = self.store.users().find_one(doc! { "_id": id }).await.map_err(db)?;
        user.map(|u| view(&u)).ok_or_else(|| ApiError::not_found(format!("user {id} not found")))
    }

    /// A page of users.
    pub async fn list(&self, req: ListUsersRequest) -> Result<UserPage, ApiError> {
        let p = proxypool_contracts::Pagination::parse(req.page, req.limit)?;
        let (page, limit, skip) = (p.page, p.limit, p.skip());
        let users = self.store.users();
        let total = users.count_documents(doc! {}).await.map_err(db)?;
        let docs: Vec<UserDoc> = users
            .find(doc! {})
            .sort(doc! { "_id": 1 })
            .skip(skip)
            .limit(limit)
            .await
            .map_err(db)?
            .try_collect()
            .await
            .map_err(db)?;
        Ok(UserPage { data: docs.iter().map(view).collect(), total, page, limit })
    }

    /// Changes any of email, username, password.
    pub async fn update(&self, id: &str, patch: UserPatch) -> Result<UserView, ApiError> {
        let id = oid("id", id)?;
        let email = patch.email.as_deref().map(valid_email).transpose()?;
        let username = patch.username.as_deref().map(valid_username).transpose()?;
        if let Some(p) = &patch.password {
            valid_password(p)?;
        }
        if email.is_none() && username.is_none() && patch.password.is_none() {
            return Err(ApiError::invalid("body", "must change at least one of email, username, password"));
        }
        if self.store.users().find_one(doc! { "_id": id }).await.map_err(db)?.is_none() {
            return Err(ApiError::not_found(format!("user {id} not found")));
        }
        self.check_unique(email.as_deref(), username.as_deref(), Some(id)).await?;
        let mut set = doc! { "updatedAt": DateTime::now() };
        if let Some(e) = email {
            set.insert("email", e);
        }
        if let Some(u) = username {
            set.insert("username", u);
        }
        if let Some(p) = patch.password {
            set.insert("password", self.hash(p).await?);
        }
        self.store.users().update_one(doc! { "_id": id }, doc! { "$set": set }).await.map_err(db)?;
        self.get(&id.to_hex()).await
    }

    /// Deletes a user.
    pub async fn delete(&self, id: &str) -> Result<Deleted, ApiError> {
        let id = oid("id", id)?;
        let res = self.store.users().delete_one(doc! { "_id": id }).await.map_err(db)?;
        if res.deleted_count == 0 {
            return Err(ApiError::not_found(format!("user {id} not found")));
        }
        Ok(Deleted { deleted: res.deleted_count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(valid_email(" Admin@Example.COM ").ok().as_deref(), Some("admin@example.com"));
        for bad in ["", "a", "a@b", "@b.c", "a@b..c", "a b@c.d", "a@.c", "a@b.c."] {
            assert!(valid_email(bad).is_err(), "{bad}");
        }
    }
}
