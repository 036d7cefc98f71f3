# Garage, the S3-compatible object store of the compose topology, on the same Debian base as
# the ChangeAgent image. The binary is built on the host (scripts/install-garage) and copied
# from the build context's bin/garage; deploy/compose does that.
ARG BASE=debian:bookworm-slim
FROM ${BASE}

RUN groupadd --system --gid 10002 garage \
    && useradd --system --uid 10002 --gid garage --home-dir /var/lib/garage --no-create-home \
       --shell /usr/sbin/nologin garage \
    && mkdir -p /var/lib/garage/meta /var/lib/garage/data \
    && chown -R garage:garage /var/lib/garage

COPY bin/garage /usr/local/bin/garage
COPY garage.toml /etc/garage.toml

ENV RUST_LOG=garage=info \
    NO_COLOR=1

USER garage
VOLUME /var/lib/garage
EXPOSE 3900 3903
STOPSIGNAL SIGTERM
# One node: Garage assigns its own layout, and creates the access key and bucket named by
# GARAGE_DEFAULT_ACCESS_KEY, GARAGE_DEFAULT_SECRET_KEY and GARAGE_DEFAULT_BUCKET.
CMD ["garage", "-c", "/etc/garage.toml", "server", "--single-node", "--default-bucket"]
