//! The one summary line a run ends with: `key=value` pairs in a fixed order, or one JSON object.

use serde_json::{Map, Number, Value};

/// The figures of one run, in the order they were added.
#[derive(Debug, Clone)]
pub struct Summary {
    fields: Vec<(String, Value)>,
}

impl Summary {
    /// A summary of `scenario`.
    pub fn new(scenario: &str) -> Summary {
        let mut s = Summary { fields: Vec::new() };
        s.text("scenario", scenario);
        s
    }

    /// Adds a text field.
    pub fn text(&mut self, key: &str, value: &str) {
        self.fields
            .push((key.to_owned(), Value::String(value.to_owned())));
    }

    /// Adds an integer field.
    pub fn int(&mut self, key: &str, value: u64) {
        self.fields
            .push((key.to_owned(), Value::Number(Number::from(value))));
    }

    /// Adds a number rounded to `decimals` places.
    pub fn float(&mut self, key: &str, value: f64, decimals: i32) {
        let scale = 10f64.powi(decimals);
        let v = (value * scale).round() / scale;
        let n = if decimals == 0 && v.abs() < 9.0e15 {
            Number::from(v as i64)
        } else {
            Number::from_f64(v).unwrap_or_else(|| Number::from(0))
        };
        self.fields.push((key.to_owned(), Value::Number(n)));
    }

    /// Appends `other`'s fields except its scenario name.
    pub fn append(&mut self, other: Summary) {
        self.fields
            .extend(other.fields.into_iter().filter(|(k, _)| k != "scenario"));
    }

    /// `natter-bench key=value key=value …`; text with spaces is quoted.
    pub fn line(&self) -> String {
        let mut out = String::from("natter-bench");
        for (k, v) in &self.fields {
            let v = match v {
                Value::String(s) if s.contains(char::is_whitespace) || s.is_empty() => {
                    format!("{s:?}")
                }
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push(' ');
            out.push_str(k);
            out.push('=');
            out.push_str(&v);
        }
        out
    }

    /// The same fields as one JSON object.
    pub fn json(&self) -> String {
        let map: Map<String, Value> = self.fields.iter().cloned().collect();
        Value::Object(map).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_json() {
        let mut s = Summary::new("pairs");
        s.int("delivered", 10);
        s.float("p50_ms", 1.23456, 3);
        s.float("msgs_per_s", 1234.6, 0);
        s.text("last_error", "two words");
        assert_eq!(
            s.line(),
            "natter-bench scenario=pairs delivered=10 p50_ms=1.235 msgs_per_s=1235 last_error=\"two words\""
        );
        let v: Value = serde_json::from_str(&s.json()).unwrap();
        assert_eq!(v["delivered"], 10);
        assert_eq!(v["msgs_per_s"], 1235);
    }
}
