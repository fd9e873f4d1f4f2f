//! The web console: the browser app built from `console/web` (see its README) into
//! `console/dist`, embedded in the binary and served over plain HTTP on the executor's port,
//! next to the gRPC services. The app talks to those same services through gRPC-web; it has no
//! API of its own. No Node.js at run time, nothing fetched from elsewhere.

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use axum::routing::get;
use http::{HeaderValue, Request, StatusCode, header};

/// One embedded file and the path it is served at.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

/// The built app: exactly the files `npm run build` writes (no hashed names, so a rebuild
/// replaces them in place; `Cache-Control: no-cache` makes browsers revalidate).
const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../dist/index.html"),
    },
    Asset {
        path: "/console/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../dist/app.js"),
    },
    Asset {
        path: "/console/app.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../dist/app.css"),
    },
];

/// Paths the console serves; the authentication layer lets them through without a token (they
/// are the same static files for everyone, and the app asks for a token itself).
pub fn is_console_path(path: &str) -> bool {
    path == "/" || path.starts_with("/console/")
}

/// The console's routes, for use as the fallback of the gRPC router: `GET /` is the app, its
/// assets live under `/console/`. A gRPC call that reaches it names a service this server does
/// not serve and is answered UNIMPLEMENTED as a gRPC status; anything else is a 404.
pub fn router() -> Router {
    let mut router = Router::new();
    for asset in ASSETS {
        router = router.route(asset.path, get(move || async move { serve(asset) }));
    }
    router.fallback(not_found)
}

fn serve(asset: &'static Asset) -> Response {
    let mut response = Response::new(Body::from(asset.body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The app loads only its own files and calls only this origin; it may not be framed.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

async fn not_found(request: Request<Body>) -> Response {
    let path = request.uri().path().to_owned();
    let grpc_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .filter(|value| value.as_bytes().starts_with(b"application/grpc"))
        .cloned();
    if let Some(content_type) = grpc_type {
        // What tonic answers for an unknown service, with a message that says which, in the
        // caller's content type (gRPC or gRPC-web).
        let status = tonic::Status::unimplemented(format!("this server does not serve {path}"));
        let mut response = status.into_http::<Body>();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, content_type);
        return response;
    }
    let mut response = Response::new(Body::from(format!(
        "404: {path} is not part of the dagmesh console (it lives at /)\n"
    )));
    *response.status_mut() = StatusCode::NOT_FOUND;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    async fn call(request: Request<Body>) -> Response {
        router().oneshot(request).await.unwrap()
    }

    #[tokio::test]
    async fn serves_the_app_and_its_assets() {
        for asset in ASSETS {
            let response = call(Request::get(asset.path).body(Body::empty()).unwrap()).await;
            assert_eq!(response.status(), StatusCode::OK, "{}", asset.path);
            assert_eq!(
                response.headers()[header::CONTENT_TYPE],
                asset.content_type,
                "{}",
                asset.path
            );
            assert!(is_console_path(asset.path));
        }
        let index = std::str::from_utf8(ASSETS[0].body).unwrap();
        assert!(index.contains("/console/app.js"), "{index}");
        assert!(index.contains("/console/app.css"), "{index}");
    }

    #[tokio::test]
    async fn unknown_paths_are_404_and_unknown_grpc_services_unimplemented() {
        let response = call(Request::get("/etc/passwd").body(Body::empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);

        let response = call(
            Request::post("/dagmesh.v1.SchedulerService/ListSchedules")
                .header(header::CONTENT_TYPE, "application/grpc-web+proto")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["grpc-status"], "12");
        assert!(
            response.headers()["grpc-message"]
                .to_str()
                .unwrap()
                .contains("SchedulerService")
        );
        // Writing to the app is not a thing.
        let response = call(Request::post("/").body(Body::empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
