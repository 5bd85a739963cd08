//! The embedded migrations.

use crate::common::empty_database_url;
use fhir_outbox::db;

async fn applied(pool: &sqlx::PgPool) -> Vec<(i64, bool)> {
    sqlx::query_as("SELECT version, success FROM _sqlx_migrations ORDER BY version")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn migrations_apply_on_an_empty_database_and_are_a_no_op_the_second_time() {
    let url = empty_database_url().await;
    let pool = db::connect(&url, 2).await.unwrap();
    db::migrate(&pool).await.unwrap();
    let first = applied(&pool).await;
    assert_eq!(first.len(), db::MIGRATOR.iter().count());
    assert!(first.iter().all(|(_, success)| *success));
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'fhir_outbox'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(tables >= 5);

    db::migrate(&pool).await.unwrap();
    assert_eq!(applied(&pool).await, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_once() {
    let url = empty_database_url().await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let pool = db::connect(&url, 1).await.unwrap();
            db::migrate(&pool).await
        }));
    }
    for task in tasks {
        task.await
            .unwrap()
            .expect("every concurrent migrate succeeds");
    }
    let pool = db::connect(&url, 1).await.unwrap();
    assert_eq!(applied(&pool).await.len(), db::MIGRATOR.iter().count());
}
