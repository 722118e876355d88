"""Push to devices with no open socket: Web Push (RFC 8030, VAPID, aes128gcm) and FCM HTTP v1.

Holds the devices a user registered (in memory on the embedded broker, in Redis beside the user's
stream otherwise) and the senders that deliver one message to one device and classify the answer.
Imports the broker (for its Redis door), telemetry, core and config; the api layer uses it.
"""

from .devices import Device, DeviceStore
from .outcome import Outcome
from .push import Push, create_push
from .webpush import PushMessage, PushTooLarge

__all__ = ["Device", "DeviceStore", "Outcome", "Push", "PushMessage", "PushTooLarge", "create_push"]
