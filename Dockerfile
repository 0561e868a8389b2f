# The server image uses a real MongoDB (see docker-compose.yml), not the embedded database.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fhir_server ./fhir_server
COPY dicom_node ./dicom_node
COPY mappings ./mappings
RUN pip install --no-cache-dir .
ENV FHIR_HOST=0.0.0.0 FHIR_DATA_DIR=/data
VOLUME /data
EXPOSE 8080 11112
CMD ["fhir-server", "serve"]
