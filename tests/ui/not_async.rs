use cottontail::{App, Json, Queue};

fn resize(Json(_width): Json<u32>) {}

fn main() {
    let _ = App::new(()).handler(Queue::new("resize"), resize);
}
