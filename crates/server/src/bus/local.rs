//! The single-node bus: every device is connected to this node, so nothing is ever sent and no record is
//! kept (routing is the in-process [`crate::delivery::Router`] alone).

use async_trait::async_trait;
use natter_proto::{DeviceId, PhoneNumber};
use tokio::sync::mpsc;

use super::messages::BusMessage;
use super::{Bucket, Bus, BusError, BusResult, Inbound};

/// One node, no bus.
#[derive(Debug)]
pub struct LocalBus {
    node_id: String,
}

impl Default for LocalBus {
    fn default() -> Self {
        Self {
            node_id: "local".into(),
        }
    }
}

#[async_trait]
impl Bus for LocalBus {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn clustered(&self) -> bool {
        false
    }

    async fn send(&self, node: &str, _msg: &BusMessage) -> BusResult<()> {
        Err(BusError::NoAnswer(node.to_owned()))
    }

    async fn broadcast(&self, _msg: &BusMessage) -> BusResult<()> {
        Ok(())
    }

    async fn request(&self, node: &str, _msg: &BusMessage) -> BusResult<BusMessage> {
        Err(BusError::NoAnswer(node.to_owned()))
    }

    async fn claim_route(
        &self,
        _phone: &PhoneNumber,
        _device: DeviceId,
    ) -> BusResult<(u64, Option<String>)> {
        Ok((0, None))
    }

    async fn route(&self, _phone: &PhoneNumber, _device: DeviceId) -> BusResult<Option<String>> {
        Ok(None)
    }

    async fn release_route(
        &self,
        _phone: &PhoneNumber,
        _device: DeviceId,
        _revision: u64,
    ) -> BusResult<()> {
        Ok(())
    }

    async fn put_record(&self, _bucket: Bucket, _key: &str, _value: Vec<u8>) -> BusResult<()> {
        Ok(())
    }

    async fn get_record(&self, _bucket: Bucket, _key: &str) -> BusResult<Option<Vec<u8>>> {
        Ok(None)
    }

    async fn delete_record(&self, _bucket: Bucket, _key: &str) -> BusResult<()> {
        Ok(())
    }

    fn take_inbound(&self) -> Option<mpsc::Receiver<Inbound>> {
        None
    }
}
