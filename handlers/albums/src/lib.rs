//! Example workflow crate: `albums`, a fan-out / fan-in (docs/contracts.md, "Workflows").
//!
//! Input `{"album_id": "a-1", "images": ["<base64 PNG/JPEG>", ...], "max_side": 64}`: one
//! `thumbnails` job per image (to the thumbnails handler's queue, through its normal
//! contract), joined when all are done. `ok` `{"album_id", "thumbnails": [{"width",
//! "height", "image"}, ...]}` in input order; if an image is undecodable, `error`
//! `{"error": {"kind": "invalid_input", "message", "index": i}}` naming the first bad one.
//! Nothing here is undone, so the workflow declares no compensation and its failure is the
//! failed child's own error.

use cottontail::workflow::{Context, Input, Workflow};
use cottontail::{HandlerError, Json};
use cottontail_thumbnails::{Request, Thumbnail};
use serde::{Deserialize, Serialize};

/// The workflow's name (its entry queue) in the contract.
pub const WORKFLOW: &str = "albums";

/// An album: the workflow's input.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Album {
    /// The album.
    pub album_id: String,
    /// Base64 PNG or JPEG images.
    #[serde(default)]
    pub images: Vec<String>,
    /// Longest side of each thumbnail (default 64).
    #[serde(default = "default_max_side")]
    pub max_side: u32,
}

fn default_max_side() -> u32 {
    64
}

/// The final `ok` reply.
#[derive(Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Thumbnails {
    /// The album.
    pub album_id: String,
    /// One per image, in input order.
    pub thumbnails: Vec<Thumbnail>,
}

/// The fan-out step: one thumbnail request per image.
pub async fn split(Input(album): Input<Album>) -> Result<Json<Vec<Request>>, HandlerError> {
    let max_side = album.max_side;
    let requests = album.images.into_iter();
    Ok(Json(
        requests.map(|image| Request { image, max_side }).collect(),
    ))
}

/// The `albums` workflow named `name`, its children sent to the thumbnails handler on
/// `thumbnails_queue` (the contract's is [`cottontail_thumbnails::QUEUE`]).
pub fn workflow<S: Clone + Send + Sync + 'static>(
    name: &str,
    thumbnails_queue: &str,
) -> Workflow<S> {
    Workflow::new(name)
        .fan_out("thumbnails", split, thumbnails_queue)
        .finish(|context: &Context| {
            let album: Album = context.input()?;
            Ok(Thumbnails {
                album_id: album.album_id,
                thumbnails: context.result("thumbnails")?,
            })
        })
}
