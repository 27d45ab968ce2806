//! What a request is, in the terms policy rules use.
//!
//! - kind: the matched route's `kind`, else by method: `read` (GET, HEAD,
//!   OPTIONS), `write` (POST, PUT, PATCH), `delete`, `websocket` (an
//!   upgrade), `other`;
//! - verb: the method;
//! - objects: the normalised path, `host:HOST`, `route:NAME` when a route
//!   matched, `header:NAME=VALUE` for the selected headers and
//!   `field:PATH=VALUE` for the selected JSON body fields;
//! - risk: the route's, else by kind.

use wicket_core::Classification;
use wicket_policy::HttpRoute;

/// Longest header or body-field value carried into a classification.
const MAX_VALUE: usize = 200;

/// A request as the gate understood it.
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    /// Method, upper case.
    pub method: String,
    /// Host, lower case, without the port.
    pub host: String,
    /// Normalised path.
    pub path: String,
    /// Raw query string (without `?`).
    pub query: String,
    /// The route that matched.
    pub route: Option<std::sync::Arc<HttpRoute>>,
    /// Selected headers `(name, value)`.
    pub headers: Vec<(String, String)>,
    /// Selected JSON body fields `(path, value)`.
    pub fields: Vec<(String, String)>,
    /// The protocol an upgrade asks for (`websocket`), lower case.
    pub upgrade: Option<String>,
}

/// Caps a value carried into a classification.
pub fn cap(v: &str) -> String {
    if v.len() <= MAX_VALUE {
        return v.to_string();
    }
    let mut end = MAX_VALUE;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &v[..end])
}

impl HttpRequest {
    /// The command class.
    pub fn kind(&self) -> String {
        if let Some(k) = self.route.as_ref().and_then(|r| r.kind.clone()) {
            return k;
        }
        if self.upgrade.is_some() {
            return "websocket".into();
        }
        match self.method.as_str() {
            "GET" | "HEAD" | "OPTIONS" => "read",
            "POST" | "PUT" | "PATCH" => "write",
            "DELETE" => "delete",
            _ => "other",
        }
        .into()
    }

    /// Risk 0..=100.
    pub fn risk(&self) -> u32 {
        if let Some(r) = self.route.as_ref().and_then(|r| r.risk) {
            return r.min(100);
        }
        match self.kind().as_str() {
            "read" => 10,
            "websocket" => 40,
            "write" => 50,
            "delete" => 70,
            _ => 60,
        }
    }

    /// `METHOD /path?query` and the selected fields, as audited.
    pub fn text(&self) -> String {
        let mut t = format!("{} {}", self.method, self.path);
        if !self.query.is_empty() {
            t.push('?');
            t.push_str(&self.query);
        }
        for (k, v) in &self.fields {
            t.push_str(&format!(" {k}={v}"));
        }
        t
    }

    /// The classification policy sees.
    pub fn classification(&self) -> Classification {
        let mut objects = vec![self.path.clone(), format!("host:{}", self.host)];
        if let Some(r) = &self.route {
            objects.push(format!("route:{}", r.name));
        }
        for (k, v) in &self.headers {
            objects.push(format!("header:{k}={v}"));
        }
        for (k, v) in &self.fields {
            objects.push(format!("field:{k}={v}"));
        }
        Classification {
            kind: self.kind(),
            verb: self.method.clone(),
            objects,
            risk: self.risk(),
            ..Default::default()
        }
    }
}

/// The string form of a selected JSON value (strings bare, others as JSON).
pub fn field_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => cap(s),
        other => cap(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str) -> HttpRequest {
        HttpRequest {
            method: method.into(),
            host: "api.internal".into(),
            path: path.into(),
            ..Default::default()
        }
    }

    #[test]
    fn methods_give_kinds_and_risks() {
        for (m, kind, risk) in [
            ("GET", "read", 10),
            ("HEAD", "read", 10),
            ("POST", "write", 50),
            ("PATCH", "write", 50),
            ("DELETE", "delete", 70),
            ("TRACE", "other", 60),
        ] {
            let c = req(m, "/x").classification();
            assert_eq!((c.kind.as_str(), c.risk, c.verb.as_str()), (kind, risk, m));
        }
        let mut ws = req("GET", "/ws");
        ws.upgrade = Some("websocket".into());
        assert_eq!(ws.kind(), "websocket");
    }

    #[test]
    fn routes_headers_and_fields_become_objects() {
        let mut r = req("POST", "/graphql");
        r.query = "debug=1".into();
        r.route = Some(std::sync::Arc::new(HttpRoute {
            name: "graphql".into(),
            methods: vec![],
            host: String::new(),
            path: "/graphql".into(),
            kind: Some("admin".into()),
            risk: Some(90),
            body_fields: vec![],
            max_body_bytes: None,
        }));
        r.headers = vec![("x-tenant".into(), "acme".into())];
        r.fields = vec![("$.operationName".into(), "DeleteUser".into())];
        let c = r.classification();
        assert_eq!(c.kind, "admin");
        assert_eq!(c.risk, 90);
        assert_eq!(
            c.objects,
            vec![
                "/graphql",
                "host:api.internal",
                "route:graphql",
                "header:x-tenant=acme",
                "field:$.operationName=DeleteUser"
            ]
        );
        assert_eq!(r.text(), "POST /graphql?debug=1 $.operationName=DeleteUser");
    }

    #[test]
    fn long_values_are_capped_on_char_boundaries() {
        let v = "é".repeat(300);
        let c = cap(&v);
        assert!(c.len() <= MAX_VALUE + 3);
        assert!(c.ends_with('…'));
        assert_eq!(field_value(&serde_json::json!(12)), "12");
    }
}
