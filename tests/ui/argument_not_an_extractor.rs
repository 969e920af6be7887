use cottontail::{App, Json, Queue};

async fn greet(name: String, Json(_n): Json<u32>) {
    let _ = name;
}

fn main() {
    let _ = App::new(()).handler(Queue::new("greetings"), greet);
}
