use cottontail::{App, Json, Queue};

struct LegacyError;

async fn charge(Json(_amount): Json<u32>) -> Result<u32, LegacyError> {
    Ok(1)
}

fn main() {
    let _ = App::new(()).handler(Queue::new("billing"), charge);
}
