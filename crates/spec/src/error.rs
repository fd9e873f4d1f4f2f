//! Errors a user reads: where in the spec (a proto field path) and what is wrong.

use std::fmt;

/// One problem in a workflow spec.
///
/// `path` uses proto field names and indexes (`steps[3].needs[0]`, `steps[0].inputs.images`,
/// `name`), or `line L, column C` for a file that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub path: String,
    pub message: String,
}

impl SpecError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a spec, in spec order; displayed one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecErrors(pub Vec<SpecError>);

impl SpecErrors {
    pub fn single(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self(vec![SpecError::new(path, message)])
    }

    pub fn iter(&self) -> std::slice::Iter<'_, SpecError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

impl IntoIterator for SpecErrors {
    type Item = SpecError;
    type IntoIter = std::vec::IntoIter<SpecError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a SpecErrors {
    type Item = &'a SpecError;
    type IntoIter = std::slice::Iter<'a, SpecError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// An expression of a step failed at run time, e.g. it read a key that an upstream step did not
/// output. Displays as `step "thumbs": input "size": no such key: width`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("step \"{step}\": input \"{input}\": {message}")]
    Input {
        step: String,
        input: String,
        message: String,
    },
    #[error("step \"{step}\": when: {message}")]
    When { step: String, message: String },
    #[error("step \"{step}\": for_each: {message}")]
    ForEach { step: String, message: String },
    #[error("step \"{step}\": cache.key: {message}")]
    CacheKey { step: String, message: String },
}
