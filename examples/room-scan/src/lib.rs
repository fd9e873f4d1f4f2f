//! The room-scan example: a workflow ([`WORKFLOW_YAML`]), the child workflow it starts
//! ([`MESH_WORKFLOW_YAML`]) and the workers that run their steps.
//!
//! The work is small but real: images are synthesised from a seed, features are image-gradient
//! corners, the mesh is a triangulated height field over those corners, thumbnails are box-filter
//! downscales. `pace_ms` slows each unit of work down so the live tree is worth watching.

use std::time::Duration;

use dagmesh_sdk::{TaskContext, TaskError, Worker, WorkerBuilder};
use serde::{Deserialize, Serialize};

/// The workflow definition, also at `examples/room-scan/workflow.yaml`.
pub const WORKFLOW_YAML: &str = include_str!("../workflow.yaml");

/// The child workflow `room-mesh` that room-scan's `reconstruct` step starts, also at
/// `examples/room-scan/mesh.yaml`; it must be registered before room-scan runs.
pub const MESH_WORKFLOW_YAML: &str = include_str!("../mesh.yaml");

/// Inputs for a demo run.
pub fn demo_inputs(pace_ms: u64) -> serde_json::Value {
    serde_json::json!({
        "room_id": "room-42",
        "image_count": 12,
        "mesh_resolution": 24,
        "notify_email": "customer@example.com",
        "pace_ms": pace_ms,
    })
}

/// The CPU pool: fetching, features, thumbnails and notifications.
pub fn cpu_worker(server: &str) -> WorkerBuilder {
    Worker::builder(server)
        .name("room-scan-cpu")
        .slots(4)
        .task("scan.fetch", "1.0.0", fetch)
        .task("scan.features", "1.1.0", features)
        .task("image.thumbnail", "1.0.0", thumbnails)
        .task("notify.send", "1.0.0", notify)
}

/// The GPU pool: mesh building, on workers labelled `gpu=true`.
pub fn gpu_worker(server: &str) -> WorkerBuilder {
    Worker::builder(server)
        .name("room-scan-gpu")
        .label("gpu", "true")
        .slots(1)
        .task("mesh.build", "1.3.0", build_mesh)
}

const SIDE: usize = 48;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Image {
    pub name: String,
    /// 32 bits, so it survives JSON numbers (doubles) on the way through the API.
    pub seed: u32,
}

#[derive(Deserialize)]
struct FetchInput {
    room_id: String,
    image_count: u32,
    #[serde(default)]
    pace_ms: u64,
    /// How many attempts find the customer's upload still in progress (a demo of a run that
    /// fails and succeeds when retried): not worth retrying on its own, so the run fails.
    #[serde(default)]
    uploads_pending: u32,
}

#[derive(Serialize)]
struct FetchOutput {
    images: Vec<Image>,
}

async fn fetch(ctx: TaskContext, input: FetchInput) -> Result<FetchOutput, TaskError> {
    if input.image_count == 0 {
        return Err(TaskError::fatal("image_count must be at least 1"));
    }
    if ctx.attempt() <= input.uploads_pending {
        return Err(TaskError::fatal(format!(
            "the photos of {} are still uploading; retry the run once the upload is done",
            input.room_id
        )));
    }
    let mut images = Vec::new();
    for index in 0..input.image_count {
        let seed = fnv(format!("{}/{index}", input.room_id).as_bytes()) as u32;
        images.push(Image {
            name: format!("{}-{index:03}.jpg", input.room_id),
            seed,
        });
        ctx.progress(
            (index + 1) as f32 / input.image_count as f32,
            format!("downloaded {}", images[index as usize].name),
        );
        pace(&ctx, input.pace_ms).await?;
    }
    ctx.info(format!("fetched {} images", images.len()));
    Ok(FetchOutput { images })
}

#[derive(Deserialize)]
struct FeaturesInput {
    images: Vec<Image>,
    shard: usize,
    shards: usize,
    /// Where the first image sits among all of the run's images (a map item's `index`), so
    /// that keypoints of different images do not overlap.
    #[serde(default)]
    position: usize,
    #[serde(default)]
    pace_ms: u64,
}

#[derive(Serialize)]
struct FeaturesOutput {
    /// Corner points as [x, y, strength], in image coordinates shifted per image.
    keypoints: Vec<[f64; 3]>,
}

async fn features(ctx: TaskContext, input: FeaturesInput) -> Result<FeaturesOutput, TaskError> {
    if input.shards == 0 || input.shard >= input.shards {
        return Err(TaskError::fatal(format!(
            "shard {} is not below shards {}",
            input.shard, input.shards
        )));
    }
    let mine: Vec<&Image> = input
        .images
        .iter()
        .skip(input.shard)
        .step_by(input.shards)
        .collect();
    let mut keypoints = Vec::new();
    for (done, image) in mine.iter().enumerate() {
        let pixels = synthesize(image.seed);
        let offset = ((input.position + done) * SIDE) as f64;
        keypoints.extend(
            corners(&pixels)
                .into_iter()
                .map(|[x, y, s]| [x + offset, y, s]),
        );
        ctx.progress_with_metrics(
            (done + 1) as f32 / mine.len().max(1) as f32,
            format!("corners in {}", image.name),
            [("keypoints".to_owned(), keypoints.len() as f64)],
        );
        pace(&ctx, input.pace_ms).await?;
    }
    Ok(FeaturesOutput { keypoints })
}

#[derive(Deserialize)]
struct MeshInput {
    #[serde(default)]
    keypoints: Vec<[f64; 3]>,
    /// Keypoints in sets (one per image, from a map of feature extractions), joined in order.
    #[serde(default)]
    keypoint_sets: Vec<Vec<[f64; 3]>>,
    resolution: usize,
    #[serde(default)]
    pace_ms: u64,
}

#[derive(Serialize)]
struct MeshOutput {
    vertices: usize,
    triangles: usize,
    surface_area: f64,
}

/// Splats keypoints into a height field and triangulates it (two triangles per cell).
async fn build_mesh(ctx: TaskContext, mut input: MeshInput) -> Result<MeshOutput, TaskError> {
    for set in std::mem::take(&mut input.keypoint_sets) {
        input.keypoints.extend(set);
    }
    let n = input.resolution.clamp(2, 256);
    if input.keypoints.is_empty() {
        return Err(TaskError::fatal("no keypoints to build a mesh from"));
    }
    let (max_x, max_y) = input
        .keypoints
        .iter()
        .fold((1.0f64, 1.0f64), |(mx, my), [x, y, _]| {
            (mx.max(*x), my.max(*y))
        });
    let mut height = vec![0.0f64; n * n];
    for [x, y, strength] in &input.keypoints {
        let gx = ((x / max_x) * (n - 1) as f64) as usize;
        let gy = ((y / max_y) * (n - 1) as f64) as usize;
        height[gy * n + gx] += strength;
    }
    let mut area = 0.0;
    for row in 0..n - 1 {
        for col in 0..n - 1 {
            let p = |r: usize, c: usize| [c as f64, r as f64, height[r * n + c]];
            let (a, b, c, d) = (
                p(row, col),
                p(row, col + 1),
                p(row + 1, col),
                p(row + 1, col + 1),
            );
            area += triangle_area(a, b, c) + triangle_area(b, d, c);
        }
        if row % 4 == 0 {
            ctx.progress_with_metrics(
                row as f32 / (n - 1) as f32,
                "triangulating",
                [("triangles".to_owned(), (2 * row * (n - 1)) as f64)],
            );
            pace(&ctx, input.pace_ms).await?;
        }
    }
    Ok(MeshOutput {
        vertices: n * n,
        triangles: 2 * (n - 1) * (n - 1),
        surface_area: (area * 100.0).round() / 100.0,
    })
}

#[derive(Deserialize)]
struct ThumbnailInput {
    images: Vec<Image>,
    size: usize,
    #[serde(default)]
    pace_ms: u64,
}

#[derive(Serialize)]
struct ThumbnailOutput {
    /// One checksum per thumbnail.
    thumbnails: Vec<String>,
}

async fn thumbnails(ctx: TaskContext, input: ThumbnailInput) -> Result<ThumbnailOutput, TaskError> {
    let size = input.size.clamp(1, SIDE);
    let mut thumbnails = Vec::new();
    for (done, image) in input.images.iter().enumerate() {
        let pixels = synthesize(image.seed);
        let small = downscale(&pixels, size);
        thumbnails.push(format!("{:016x}", fnv(&small)));
        ctx.progress(
            (done + 1) as f32 / input.images.len().max(1) as f32,
            format!("thumbnail of {}", image.name),
        );
        pace(&ctx, input.pace_ms / 2).await?;
    }
    Ok(ThumbnailOutput { thumbnails })
}

#[derive(Deserialize)]
struct NotifyInput {
    email: String,
    room_id: String,
    triangles: u64,
    thumbnails: u64,
    /// The run's outcome when called from an exit hook (`run.state`), and why it failed.
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    error: String,
}

#[derive(Serialize)]
struct NotifyOutput {
    message: String,
}

async fn notify(ctx: TaskContext, input: NotifyInput) -> Result<NotifyOutput, TaskError> {
    let message = if input.state.as_deref() == Some("FAILED") {
        format!(
            "{}: we could not finish your scan of {} ({})",
            input.email, input.room_id, input.error
        )
    } else {
        format!(
            "{}: your scan of {} is ready ({} triangles, {} thumbnails)",
            input.email, input.room_id, input.triangles, input.thumbnails
        )
    };
    ctx.info(message.clone());
    Ok(NotifyOutput { message })
}

/// Waits `ms`, or fails the attempt if it was cancelled meanwhile.
async fn pace(ctx: &TaskContext, ms: u64) -> Result<(), TaskError> {
    if ms > 0 {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(ms)) => {}
            () = ctx.cancelled() => {}
        }
    }
    if ctx.is_cancelled() {
        return Err(TaskError::retryable("cancelled"));
    }
    Ok(())
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A SIDE x SIDE grey image: smooth blobs from a xorshift sequence.
fn synthesize(seed: u32) -> Vec<u8> {
    let mut state = u64::from(seed) << 16 | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let blobs: Vec<(f64, f64, f64)> = (0..6)
        .map(|_| {
            let x = (next() % SIDE as u64) as f64;
            let y = (next() % SIDE as u64) as f64;
            let r = 3.0 + (next() % 8) as f64;
            (x, y, r)
        })
        .collect();
    let mut pixels = vec![0u8; SIDE * SIDE];
    for y in 0..SIDE {
        for x in 0..SIDE {
            let value: f64 = blobs
                .iter()
                .map(|(bx, by, r)| {
                    let d2 = (x as f64 - bx).powi(2) + (y as f64 - by).powi(2);
                    255.0 * (-d2 / (2.0 * r * r)).exp()
                })
                .sum();
            pixels[y * SIDE + x] = value.min(255.0) as u8;
        }
    }
    pixels
}

/// Points where the gradient is strong in both directions (a cheap corner detector).
fn corners(pixels: &[u8]) -> Vec<[f64; 3]> {
    let at = |x: usize, y: usize| f64::from(pixels[y * SIDE + x]);
    let mut found = Vec::new();
    for y in 1..SIDE - 1 {
        for x in 1..SIDE - 1 {
            let gx = at(x + 1, y) - at(x - 1, y);
            let gy = at(x, y + 1) - at(x, y - 1);
            let strength = (gx.abs() * gy.abs()).sqrt();
            if strength > 40.0 && (x + y) % 3 == 0 {
                found.push([
                    x as f64,
                    y as f64,
                    (strength / 255.0 * 100.0).round() / 100.0,
                ]);
            }
        }
    }
    found
}

fn downscale(pixels: &[u8], size: usize) -> Vec<u8> {
    let cell = SIDE / size;
    (0..size * size)
        .map(|i| {
            let (ty, tx) = (i / size, i % size);
            let mut sum = 0u32;
            for y in ty * cell..(ty + 1) * cell {
                for x in tx * cell..(tx + 1) * cell {
                    sum += u32::from(pixels[y * SIDE + x]);
                }
            }
            (sum / (cell * cell) as u32) as u8
        })
        .collect()
}

fn triangle_area(a: [f64; 3], b: [f64; 3], c: [f64; 3]) -> f64 {
    let u = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
    let v = [c[0] - a[0], c[1] - a[1], c[2] - a[2]];
    let cross = [
        u[1] * v[2] - u[2] * v[1],
        u[2] * v[0] - u[0] * v[2],
        u[0] * v[1] - u[1] * v[0],
    ];
    0.5 * (cross[0].powi(2) + cross[1].powi(2) + cross[2].powi(2)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_images_have_corners_and_differ_by_seed() {
        let a = synthesize(1);
        let b = synthesize(2);
        assert_ne!(a, b);
        assert!(!corners(&a).is_empty(), "a blob image must have corners");
    }

    #[test]
    fn downscale_keeps_mean_brightness() {
        let pixels = synthesize(7);
        let small = downscale(&pixels, 16);
        let mean = |p: &[u8]| p.iter().map(|&v| f64::from(v)).sum::<f64>() / p.len() as f64;
        assert!((mean(&pixels) - mean(&small)).abs() < 2.0);
    }
}
