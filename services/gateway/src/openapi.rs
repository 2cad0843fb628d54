//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` annotations, and the Swagger UI.
//!
//! The router is built from the same annotations (`utoipa_axum::routes!`), so a route cannot be served without
//! being documented; `tests/openapi.rs` checks the document against the live server.

use proxypool_contracts::ApiError;
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// Every error response: `{"error": {"code", "message", "field"?, "retry_after_secs"?}}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ApiError,
}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("A token from POST /api/login (14 days)."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "Authorization",
                "The raw ALLOWED_API_KEY. Consumer routes also require an IP in IP_ALLOWED.",
            ))),
        );
    }
}

/// Document metadata; paths are added by the router (see [`crate::router`]).
#[derive(OpenApi)]
#[openapi(
    info(title = "proxypool", description = "Rotating proxy pool: consumer leases and the admin API."),
    modifiers(&Security),
    components(schemas(ErrorBody, proxypool_contracts::ErrorCode)),
    tags(
        (name = "consumer", description = "Lease and return proxies"),
        (name = "auth", description = "Register, log in"),
        (name = "users", description = "Users"),
        (name = "providers", description = "Proxy providers"),
        (name = "packages", description = "Proxy packages"),
        (name = "proxies", description = "Proxies"),
        (name = "imports", description = "Import proxies from spreadsheets and provider APIs, as tracked jobs"),
        (name = "health", description = "Probes"),
    )
)]
pub struct ApiDoc;
