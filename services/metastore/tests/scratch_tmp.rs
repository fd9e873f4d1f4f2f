use std::time::Instant;
use dagmesh_metastore::{MetadataStore, SqlStore};
use dagmesh_proto::v1::*;

#[tokio::test]
async fn unreachable_pg() {
    let t = Instant::now();
    let r = SqlStore::connect("postgres://postgres@127.0.0.1:1/x").await;
    println!("unreachable: {:?} in {:?}", r.err(), t.elapsed());
    let t = Instant::now();
    let r = SqlStore::connect("postgres://postgres@127.0.0.1:5432/does_not_exist").await;
    println!("nodb: {:?} in {:?}", r.err(), t.elapsed());
}

async fn bench(store: &dyn MetadataStore, label: &str) {
    let n = 500;
    let t = Instant::now();
    for i in 0..n {
        let run_id = format!("{i:08x}-0000-7000-8000-000000000000");
        let mut muts = vec![Mutation { mutation: Some(mutation::Mutation::PutRun(Run { run_id: run_id.clone(), workflow: "w".into(), state: 2, ..Default::default() })) }];
        for s in 0..5 {
            muts.push(Mutation { mutation: Some(mutation::Mutation::PutStep(Step { run_id: run_id.clone(), step_id: format!("s{s}"), state: 4, ..Default::default() })) });
        }
        for seq in 1..=5u64 {
            muts.push(Mutation { mutation: Some(mutation::Mutation::AppendEvent(RunEvent { run_id: run_id.clone(), seq, ..Default::default() })) });
        }
        store.commit(muts).await.unwrap();
    }
    println!("{label}: {n} commits of 11 mutations in {:?} ({:?}/commit)", t.elapsed(), t.elapsed() / n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_commit() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqlStore::connect(&format!("sqlite://{}/b.db", dir.path().display())).await.unwrap();
    bench(&s, "sqlite").await;
    let _ = std::process::Command::new("psql").args(["-h","127.0.0.1","-U","postgres","-c","CREATE DATABASE dagmesh_scratch_bench"]).output();
    let p = SqlStore::connect("postgres://postgres@127.0.0.1:5432/dagmesh_scratch_bench").await.unwrap();
    bench(&p, "postgres").await;
    p.close().await;
    let _ = std::process::Command::new("psql").args(["-h","127.0.0.1","-U","postgres","-c","DROP DATABASE dagmesh_scratch_bench WITH (FORCE)"]).output();
}
