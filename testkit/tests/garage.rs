//! The Garage harness end to end: a real server, reached through the
//! `object_store` crate configured only from what the harness exposes, takes
//! a put, a multipart upload, lists and deletes, and gives back the bytes.

use changeagent_testkit::garage::GarageServer;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload, WriteMultipart};

/// The smallest part S3 accepts in a multipart upload (except the last).
const PART_SIZE: usize = 5 * 1024 * 1024;

/// A store configured the way `AmazonS3Builder::from_env()` would be in a
/// child process given `garage.env()`, with the bucket from `garage.url(..)`.
fn store(garage: &GarageServer) -> AmazonS3 {
    let mut builder = AmazonS3Builder::new();
    for (key, value) in garage.env() {
        let key: AmazonS3ConfigKey = key
            .to_ascii_lowercase()
            .parse()
            .unwrap_or_else(|e| panic!("{key} is no object_store setting: {e}"));
        builder = builder.with_config(key, value);
    }
    builder.with_url(garage.url("")).build().unwrap()
}

/// `len` pseudo-random bytes, so a part written twice, dropped or swapped
/// shows in the bytes read back.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

#[tokio::test]
async fn object_store_put_get_list_delete_and_multipart_against_garage() {
    let garage = GarageServer::start().await;
    assert!(garage.endpoint().starts_with("http://127.0.0.1:"));
    assert_eq!(
        garage.url("/ckpt/"),
        format!("s3://{}/ckpt/", garage.bucket())
    );
    let env = garage.env();
    for key in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "AWS_ENDPOINT",
        "AWS_ALLOW_HTTP",
    ] {
        assert!(env.iter().any(|(k, _)| k == key), "{key} missing: {env:?}");
    }
    let store = store(&garage);

    // One plain PUT, read back whole and by range.
    let small = Path::from("roundtrip/small.txt");
    store
        .put(&small, PutPayload::from_static(b"hello garage"))
        .await
        .unwrap();
    let got = store.get(&small).await.unwrap().bytes().await.unwrap();
    assert_eq!(&got[..], b"hello garage");
    let range = store.get_range(&small, 6..12).await.unwrap();
    assert_eq!(&range[..], b"garage");

    // A multipart upload of two full parts and a short last one.
    let big = Path::from("roundtrip/big.bin");
    let data = pattern(2 * PART_SIZE + 12_345);
    let upload = store.put_multipart(&big).await.unwrap();
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    for piece in data.chunks(1024 * 1024 + 7) {
        writer.write(piece);
    }
    let put = writer.finish().await.unwrap();
    // S3 names a multipart object's ETag after its part count.
    let etag = put.e_tag.expect("an ETag for the multipart upload");
    assert!(etag.trim_matches('"').ends_with("-3"), "ETag {etag}");
    let meta = store.head(&big).await.unwrap();
    assert_eq!(meta.size, data.len() as u64);
    let got = store.get(&big).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(
        got[..] == data[..],
        "the multipart object came back changed"
    );

    // LIST sees both under the prefix, and nothing outside it.
    store
        .put(&Path::from("elsewhere/x"), PutPayload::from_static(b"x"))
        .await
        .unwrap();
    let mut listed: Vec<(String, u64)> = store
        .list(Some(&Path::from("roundtrip")))
        .map_ok(|m| (m.location.to_string(), m.size))
        .try_collect()
        .await
        .unwrap();
    listed.sort();
    assert_eq!(
        listed,
        vec![
            ("roundtrip/big.bin".to_string(), data.len() as u64),
            ("roundtrip/small.txt".to_string(), 12),
        ]
    );

    // DELETE: gone for GET and LIST; the other object stays.
    store.delete(&small).await.unwrap();
    match store.get(&small).await {
        Err(object_store::Error::NotFound { .. }) => {}
        other => panic!("GET after DELETE: {other:?}"),
    }
    let listed: Vec<String> = store
        .list(Some(&Path::from("roundtrip")))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(listed, vec!["roundtrip/big.bin".to_string()]);
}

#[tokio::test]
async fn two_servers_run_side_by_side() {
    let (a, b) = tokio::join!(GarageServer::start(), GarageServer::start());
    assert_ne!(a.s3_addr(), b.s3_addr());
    let (sa, sb) = (store(&a), store(&b));
    let key = Path::from("only-in-a");
    sa.put(&key, PutPayload::from_static(b"a")).await.unwrap();
    assert!(matches!(
        sb.head(&key).await,
        Err(object_store::Error::NotFound { .. })
    ));
}
