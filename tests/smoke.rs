mod support;
use support::*;
use tokenrelay::config::ComplianceLevel;

#[tokio::test]
async fn provision_and_reference() {
    let s = TestServer::start(config(ComplianceLevel::SaqD)).await;
    let t = s.provision(VISA).await;
    let id = t["id"].as_str().unwrap();
    let r = s.reference(id).await;
    assert!(r.starts_with("cref_"));
    s.stop().await;
}
