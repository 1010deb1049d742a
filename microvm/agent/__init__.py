"""The guest agent and its wire protocol.

This package is shipped into every sandbox's initramfs as `microvm_agent`
(sandbox/boot.py), so the agent always matches the host's microvm. It must
therefore import nothing from the rest of microvm: only the standard
library, msgpack, and (in the guest, for `call`) cloudpickle and tblib.
"""
