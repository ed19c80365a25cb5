"""The splitc runtime: loads a bundle and runs it. numpy plus a backend runtime, nothing else.

    from splitc.runtime import Bundle, SplitSession
    session = SplitSession(Bundle.open("model.splitc"))
    outputs = session.run({"x": x})
"""

from splitc.core.manifest import Manifest, PartitionSpec, TensorSpec
from splitc.runtime.session import Answer, Bundle, SplitSession

__all__ = ["Answer", "Bundle", "Manifest", "PartitionSpec", "SplitSession", "TensorSpec"]
