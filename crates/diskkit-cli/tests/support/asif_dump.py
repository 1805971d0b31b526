"""Read an ASIF image with dissect.hypervisor (an independent reader) and write its virtual
disk to a file. Usage: asif_dump.py IMAGE OUT. Prints the metadata dictionary as JSON."""
import json
import sys

from dissect.hypervisor.disk.asif import ASIF

with open(sys.argv[1], "rb") as fh:
    image = ASIF(fh)
    stream = image.open()
    with open(sys.argv[2], "wb") as out:
        remaining = image.size
        while remaining:
            chunk = stream.read(min(remaining, 4 << 20))
            if not chunk:
                raise SystemExit("short read")
            out.write(chunk)
            remaining -= len(chunk)
    print(json.dumps({
        "size": image.size,
        "block_size": image.block_size,
        "chunk_size": image.chunk_size,
        "guid": str(image.guid),
        "metadata": image.metadata,
    }, default=str))
