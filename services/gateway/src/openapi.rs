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

/// Adds the one answer every operation can give whatever it does, `500 internal` (a bug, logged with its cause),
/// so that each handler's `responses(...)` lists only what depends on the route. Runs in [`crate::router_and_doc`]
/// once the paths are in; an operation that documents its own 500 keeps it.
pub struct InternalError;

impl Modify for InternalError {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let internal = ResponseBuilder::new()
            .description("internal: a bug or unexpected state; logged with its cause")
            .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
            .build();
        for item in openapi.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ];
            for op in ops.into_iter().flatten() {
                op.responses.responses.entry("500".to_owned()).or_insert_with(|| internal.clone().into());
            }
        }
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
