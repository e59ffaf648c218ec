// The REST API reference: Swagger UI over the server's own OpenAPI
// document. "Authorize" takes an API key; "Try it out" sends requests to
// this origin only (the page's Content-Security-Policy allows no other).
window.addEventListener('load', () => {
  window.ui = SwaggerUIBundle({
    url: '/api/v1/openapi.json',
    dom_id: '#swagger-ui',
    deepLinking: true,
    // Swagger UI would otherwise send the document to validator.swagger.io.
    validatorUrl: null,
    // Keys stay in this tab's memory, never in localStorage.
    persistAuthorization: false,
  });
});
