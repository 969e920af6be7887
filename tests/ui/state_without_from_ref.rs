use cottontail::{App, Queue, State};

#[derive(Clone)]
struct AppState;

#[derive(Clone)]
struct Db;

async fn save(State(_db): State<Db>) {}

fn main() {
    let _ = App::new(AppState).handler(Queue::new("saves"), save);
}
