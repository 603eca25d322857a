//! Server reflection, as `grpcurl` uses it: list the services, then fetch the descriptor
//! that defines one.

use tonic::transport::Channel;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

use crate::cluster::{fixture, Cluster};

fn ask(m: MessageRequest) -> ServerReflectionRequest {
    ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_and_describes_every_public_service() {
    let c = Cluster::start(&fixture("glm_pattern"), 1, &[], &[]).await;
    let ch = Channel::from_shared(format!("http://{}", c.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(ch);
    let requests = vec![
        ask(MessageRequest::ListServices(String::new())),
        ask(MessageRequest::FileContainingSymbol("indexrelay.v1.Generation".into())),
        ask(MessageRequest::FileContainingSymbol(
            "indexrelay.v1.NoSuchService".into(),
        )),
    ];
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();

    let Some(MessageResponse::ListServicesResponse(list)) = answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "indexrelay.v1.Generation",
        "indexrelay.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }

    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected the descriptor of indexrelay.v1.Generation");
    };
    let file =
        <prost_types::FileDescriptorProto as prost::Message>::decode(&files.file_descriptor_proto[0][..]).unwrap();
    assert_eq!(file.package(), "indexrelay.v1");
    let generation = file.service.iter().find(|s| s.name() == "Generation").unwrap();
    let generate = generation.method.iter().find(|m| m.name() == "Generate").unwrap();
    assert!(generate.server_streaming(), "Generate streams its answer");

    // tonic's reflection server ends the stream with NOT_FOUND for an unknown symbol.
    let e = answers.message().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    assert!(e.message().contains("NoSuchService"), "{}", e.message());
}
