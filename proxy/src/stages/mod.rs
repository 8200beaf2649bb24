//! The pipeline's stages, one module each. A stage takes small inputs (headers, the snapshot's
//! tables, the tool call) and returns `Result<_, Refusal>`; none imports the pipeline or the
//! process state, so each can be read and tested on its own. The order they run in is
//! [`crate::pipeline`]'s `run`.

pub(crate) mod body;
pub(crate) mod budget;
pub(crate) mod fresh;
pub(crate) mod idempotency;
pub(crate) mod policy;
pub(crate) mod tools;
