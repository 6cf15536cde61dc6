//! The protobuf codec of the generated services and clients (build.rs names it): tonic's, except
//! that a request a server cannot decode is INVALID_ARGUMENT, the caller's mistake, where tonic
//! says INTERNAL. An answer a client cannot decode stays INTERNAL: that one is the server's.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};

use super::error::ApiError;
use super::pb;

/// Who is at fault when a message does not decode: the messages a server receives are the
/// caller's, the answers a client receives the server's. Every message an RPC takes or returns
/// says which it is (a new RPC does not compile until its messages do).
pub trait Received {
    const CODE: Code;
}

macro_rules! received {
    ($code:expr => $($message:ident),+ $(,)?) => {
        $(impl Received for pb::$message {
            const CODE: Code = $code;
        })+
    };
}

received!(Code::InvalidArgument =>
    StartTestFailoverRequest, StartLiveFailoverRequest, EndTestFailoverRequest,
    CancelFailoverRequest, ResolveFailoverRequest, GetFailoverRequest, ListFailoversRequest, WatchFailoverRequest,
    CheckReadinessRequest, UpsertVmRequest, GetVmRequest, ListVmsRequest,
    SetNetworkMappingsRequest, GetNetworkMappingsRequest, SubmitWorkflowRequest,
    GetWorkflowRequest, ListWorkflowsRequest, WatchWorkflowRequest, SignalWorkflowRequest,
    CancelWorkflowRequest, ListDefinitionsRequest,
);
received!(Code::Internal =>
    FailoverJob, ListFailoversResponse, WatchEvent, ReadinessReport, Vm, ListVmsResponse,
    NetworkMappings, Workflow, ListWorkflowsResponse, SignalOutcome, ListDefinitionsResponse,
);

/// Encodes `T` as tonic does; decodes `U`, and says whose fault it is when it cannot.
#[derive(Debug, Clone)]
pub struct ProstCodec<T, U> {
    inner: tonic_prost::ProstCodec<T, U>,
}

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        ProstCodec {
            inner: tonic_prost::ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for ProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Received + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <tonic_prost::ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder(PhantomData)
    }
}

#[derive(Debug)]
pub struct ProstDecoder<U>(PhantomData<U>);

impl<U: Message + Default + Received> Decoder for ProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(undecodable::<U>)
    }
}

/// The status of a `U` that did not decode.
fn undecodable<U: Received>(e: prost::DecodeError) -> Status {
    let name = std::any::type_name::<U>().rsplit("::").next().unwrap_or("message");
    let why = format!("not a valid tern.v1.{name}: {e}");
    match U::CODE {
        Code::InvalidArgument => {
            // No correlation id reached the codec: the error gets one of its own.
            ApiError::field("request", why).into_status(&uuid::Uuid::new_v4().to_string())
        }
        code => Status::new(code, why),
    }
}

#[cfg(test)]
mod tests {
    use tonic_types::StatusExt;

    use super::*;

    #[test]
    fn a_request_that_does_not_decode_is_the_callers_mistake() {
        // Field 1 (vm_id), a string of two bytes that are not UTF-8.
        let e = pb::StartTestFailoverRequest::decode(&[0x0a, 0x02, 0xff, 0xfe][..]).unwrap_err();
        let s = undecodable::<pb::StartTestFailoverRequest>(e.clone());
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message().contains("tern.v1.StartTestFailoverRequest"),
            "{}",
            s.message()
        );
        let d = s.get_error_details();
        assert_eq!(d.error_info().map(|i| i.reason.as_str()), Some("INVALID_ARGUMENT"));
        assert_eq!(
            d.bad_request().map(|b| b.field_violations[0].field.as_str()),
            Some("request")
        );
        let s = undecodable::<pb::FailoverJob>(e);
        assert_eq!(s.code(), Code::Internal);
    }
}
